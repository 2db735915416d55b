"""Build bncore's Cython extensions, with OpenMP when the compiler has it.

Environment switches (read at build time):

* ``BNCORE_NO_OPENMP=1``  build serial on purpose (recorded in the binary).
* ``BNCORE_PORTABLE=1``   do not add ``-march=native`` (for wheels that must
  run on other CPUs); the default tunes for the machine that builds.
* ``BNCORE_DEBUG=1``      ``-O0 -g``, for valgrind and sanitizers.

The OpenMP decision is probed by compiling and linking a small program. When
the probe fails the build warns and goes serial; the binary records why, and
``bncore.show_config()`` and the test-suite report it, so OpenMP is never
lost silently.
"""
import os
import shlex
import shutil
import sys
import tempfile
import textwrap
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PACKAGES_WITH_KERNELS = {
    "bncore._openmp": "bncore/_openmp.pyx",
    "bncore._bn_kernels": "bncore/_bn_kernels.pyx",
    "bncore._optim_kernels": "bncore/_optim_kernels.pyx",
}


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _compiles(compiler, source, compile_args=(), link_args=()):
    """True when `source` (C) compiles and links with the given flags."""
    tmp = tempfile.mkdtemp(prefix="bncore-probe-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as fh:
            fh.write(source)
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=list(compile_args))
            # LDFLAGS reach the extensions' link (linker_so) but not link_executable:
            # a sanitizer build (CFLAGS/LDFLAGS=-fsanitize=...) would fail every
            # probe and build serial without -march=native
            compiler.link_executable(objs, "probe", output_dir=tmp,
                                     extra_postargs=list(link_args)
                                     + shlex.split(os.environ.get("LDFLAGS", "")))
        except Exception:  # noqa: BLE001 - any compiler failure means "no"
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


OPENMP_PROBE = textwrap.dedent("""
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n > 0 ? 0 : 1;
    }
""")

TRIVIAL = "int main(void) { return 0; }\n"


class BuildExt(build_ext):
    """build_ext that probes OpenMP and optimisation flags before compiling."""

    def build_extensions(self):
        cc = self.compiler
        is_msvc = cc.compiler_type == "msvc"
        compile_args, link_args, macros = [], [], []
        note = ""

        if is_msvc:
            compile_args.append("/O2")
        elif _env_flag("BNCORE_DEBUG"):
            compile_args += ["-O0", "-g"]
        else:
            # -fno-math-errno: sqrt may then be vectorized (errno is never read)
            compile_args += ["-O3", "-fno-math-errno"]
            if not _env_flag("BNCORE_PORTABLE") and _compiles(cc, TRIVIAL, ["-march=native"]):
                compile_args.append("-march=native")
            # Fused multiply-adds wherever the target has FMA, whatever the
            # C dialect or CFLAGS (-std=c99 and -ffp-contract=off turn GCC's
            # default off): bncore/_float_rows.h's intrinsic loops compute
            # fma(a, b, c) and must give the bits of the Cython loops they
            # stand in for, which contract a * b + c only under this flag.
            if _compiles(cc, TRIVIAL, ["-ffp-contract=fast"]):
                compile_args.append("-ffp-contract=fast")
            # The channels-last loops update four rows per pass; GCC's default
            # of 10 run-time alias checks is too few to vectorize them.
            alias = ["--param", "vect-max-version-for-alias-checks=64"]
            if _compiles(cc, TRIVIAL, alias):
                compile_args += alias

        openmp_requested = not _env_flag("BNCORE_NO_OPENMP")
        if openmp_requested:
            omp_c = ["/openmp"] if is_msvc else ["-fopenmp"]
            omp_l = [] if is_msvc else ["-fopenmp"]
            if _compiles(cc, OPENMP_PROBE, omp_c, omp_l):
                compile_args += omp_c
                link_args += omp_l
            else:
                note = ("the compiler could not build an OpenMP program; "
                        "bncore was built serial")
                warnings.warn("bncore: " + note + " (install libgomp / libomp, "
                              "or set BNCORE_NO_OPENMP=1 to silence this)")
                print("WARNING: bncore: " + note, file=sys.stderr)
        else:
            note = "serial build requested with BNCORE_NO_OPENMP=1"

        flags = " ".join(compile_args + [f for f in link_args if f not in compile_args])
        macros += [
            ("BNCORE_BUILD_FLAGS", '"%s"' % flags),
            ("BNCORE_OPENMP_REQUESTED", "1" if openmp_requested else "0"),
            ("BNCORE_OPENMP_NOTE", '"%s"' % note),
        ]
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + compile_args
            ext.extra_link_args = list(ext.extra_link_args or []) + link_args
            ext.define_macros = list(ext.define_macros or []) + macros
        super().build_extensions()


def extensions():
    from Cython.Build import cythonize

    import numpy

    exts = [
        Extension(name, [src], include_dirs=["bncore", numpy.get_include()],
                  define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
        for name, src in PACKAGES_WITH_KERNELS.items()
    ]
    return cythonize(
        exts,
        compiler_directives={"language_level": "3"},
        include_path=["."],
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
