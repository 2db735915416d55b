"""Test machinery that ships with bncore: the float64 oracle, the op registry
and the finite-difference checker that `bncore check` and the test-suite share."""
