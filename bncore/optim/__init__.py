"""Optimizer classes, checkpoints and learning-rate schedules (PyTorch-shaped).

    opt = bncore.optim.Adam(params, lr=1e-3)                 # convention="torch"
    opt = bncore.optim.Adam(params, convention="keras")      # Keras' epsilon-hat Adam
    opt.step(grads)
    bncore.optim.save(opt, "ckpt.npz"); bncore.optim.load(opt, "ckpt.npz")
"""
from bncore.optim.algorithms import SGD, Adagrad, Adam, AdamW, RMSprop
from bncore.optim.checkpoint import load, save
from bncore.optim.optimizer import Optimizer
from bncore.optim.schedules import cosine_lr, linear_warmup, set_lr, step_lr

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "save", "load",
           "step_lr", "cosine_lr", "linear_warmup", "set_lr"]
