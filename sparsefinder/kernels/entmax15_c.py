r"""The compiled sort-free 1.5-entmax kernel: its C source, its build and its loading.

The algorithm, and why its rows agree with :func:`entmax.entmax15`, are in
:mod:`sparsefinder.kernels.entmax15`, which calls it.

The kernel of :mod:`sparsefinder.kernels.entmax15` is C (below), compiled once with the system C compiler into
``$SPARSEFINDER_CACHE/kernels`` (default ``~/.cache/sparsefinder/kernels``) and loaded with
:mod:`ctypes`. Rows go, in chunks, to ``torch.get_num_threads()`` threads. Where torch runs on
GNU OpenMP (its Linux wheels) the kernel is built with ``-fopenmp`` and takes them from torch's
own OpenMP pool: after torch's last parallel op (the q·kᵀ product) those workers are still
spinning, so they pick up chunks at once; a thread of the kernel's own would compete with
them for the core, and that made two threads no faster than one. Elsewhere (or with
``SPARSEFINDER_ENTMAX_OPENMP=0``) the calling thread and ``torch.get_num_threads() - 1``
detached POSIX threads take chunks from an atomic counter, and the call returns once every
chunk is done, so a helper that a busy machine schedules late takes fewer chunks instead
of holding the call up. Either way each row is computed alone, with the same bits.
AVX-512 is used where the CPU has it, plain C elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>

#define MAXIT 60
#define CAND_MARGIN 1e-3f
#define DROP_MARGIN 1e-3

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HAVE_X86 0
#define CLONES
#endif

static float row_max_generic(const float *xr, int64_t n) {
    float m = xr[0];
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = xr[j] > m ? xr[j] : m;
    return m;
}

/* z = (x - m) / 2 into yr; candidates z > -1 - margin packed into cand; returns their count */
static int64_t z_compact_generic(const float *xr, float *yr, float *cand, int64_t n, float m, double *s) {
    int64_t c = 0;
    const float thr = -1.0f - CAND_MARGIN;
    float s1 = 0.0f, s2 = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
        float z = (xr[j] - m) * 0.5f;
        float u = z + 1.0f;
        u = u > 0.0f ? u : 0.0f;
        s1 += u;
        s2 += u * u;
        yr[j] = z;
        cand[c] = z;
        c += z > thr;
    }
    s[0] = s1;
    s[1] = s2;
    return c;
}

#if HAVE_X86
__attribute__((target("avx512f")))
static float row_max_avx512(const float *xr, int64_t n) {
    __m512 vm = _mm512_set1_ps(xr[0]);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(xr + j));
    if (j < n) {
        __mmask16 k = (__mmask16)((1u << (n - j)) - 1u);
        vm = _mm512_mask_max_ps(vm, k, vm, _mm512_maskz_loadu_ps(k, xr + j));
    }
    return _mm512_reduce_max_ps(vm);
}

/* compress in a register, then a full store: cand needs 16 floats of slack
   (a compress straight to memory is microcoded and slow on some CPUs) */
__attribute__((target("avx512f")))
static int64_t z_compact_avx512(const float *xr, float *yr, float *cand, int64_t n, float m, double *s) {
    const __m512 vm = _mm512_set1_ps(m), half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    const __m512 thr = _mm512_set1_ps(-1.0f - CAND_MARGIN), zero = _mm512_setzero_ps();
    __m512 s1 = zero, s2 = zero;
    int64_t c = 0, j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 z = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + j), vm), half);
        __m512 u = _mm512_max_ps(_mm512_add_ps(z, one), zero);
        s1 = _mm512_add_ps(s1, u);
        s2 = _mm512_add_ps(s2, _mm512_mul_ps(u, u));
        _mm512_storeu_ps(yr + j, z);
        __mmask16 k = _mm512_cmp_ps_mask(z, thr, _CMP_GT_OQ);
        _mm512_storeu_ps(cand + c, _mm512_maskz_compress_ps(k, z));
        c += __builtin_popcount((unsigned)k);
    }
    if (j < n) {
        __mmask16 t = (__mmask16)((1u << (n - j)) - 1u);
        __m512 z = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, xr + j), vm), half);
        __m512 u = _mm512_maskz_max_ps(t, _mm512_add_ps(z, one), zero);
        s1 = _mm512_add_ps(s1, u);
        s2 = _mm512_add_ps(s2, _mm512_mul_ps(u, u));
        _mm512_mask_storeu_ps(yr + j, t, z);
        __mmask16 k = _mm512_mask_cmp_ps_mask(t, z, thr, _CMP_GT_OQ);
        _mm512_storeu_ps(cand + c, _mm512_maskz_compress_ps(k, z));
        c += __builtin_popcount((unsigned)k);
    }
    s[0] = _mm512_reduce_add_ps(s1);
    s[1] = _mm512_reduce_add_ps(s2);
    return c;
}
#endif

/* keep the candidates z > thr, in place and in order; returns their count */
static int64_t drop_generic(float *cand, int64_t c, float thr) {
    int64_t c2 = 0;
    for (int64_t j = 0; j < c; ++j) {
        float z = cand[j];
        cand[c2] = z;
        c2 += z > thr;
    }
    return c2;
}

#if HAVE_X86
__attribute__((target("avx512f")))
static int64_t drop_avx512(float *cand, int64_t c, float thr) {
    const __m512 vt = _mm512_set1_ps(thr);
    int64_t c2 = 0, j = 0;
    for (; j < c; j += 16) { /* writes stay below the block just read, plus the 16-float slack */
        __mmask16 t = c - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (c - j)) - 1u);
        __m512 z = _mm512_maskz_loadu_ps(t, cand + j);
        __mmask16 k = _mm512_mask_cmp_ps_mask(t, z, vt, _CMP_GT_OQ);
        _mm512_storeu_ps(cand + c2, _mm512_maskz_compress_ps(k, z));
        c2 += __builtin_popcount((unsigned)k);
    }
    return c2;
}
#endif

/* tau from the candidates (see the Python module docstring); 0 if not certified */
CLONES
static int solve(float *cand, int64_t c, int avx512, double t, double *tau_out, double *near_out, double *sd_out) {
    for (int it = 0; it < MAXIT; ++it) {
        double cnt = 0.0, s1 = 0.0, s2 = 0.0, mn = INFINITY;
#pragma omp simd reduction(+ : cnt, s1, s2) reduction(min : mn)
        for (int64_t j = 0; j < c; ++j) {
            double z = (double)cand[j];
            double u = z - t;
            int in = u > 0.0;
            cnt += in ? 1.0 : 0.0;
            u = in ? u : 0.0;
            s1 += u;
            s2 += u * u;
            double zz = in ? z : INFINITY;
            mn = zz < mn ? zz : mn;
        }
        if (!(s2 >= 1.0) || !(s1 > 0.0)) return 0; /* t is not below tau (NaN, rounding) */
        double disc = s1 * s1 - cnt * (s2 - 1.0);
        if (disc >= 0.0) {
            double d = (s1 - sqrt(disc)) / cnt;
            double tq = t + d;
            if (tq <= mn) {
                double near = INFINITY;
#pragma omp simd reduction(min : near)
                for (int64_t j = 0; j < c; ++j) {
                    double a = fabs((double)cand[j] - tq);
                    near = a < near ? a : near;
                }
                *tau_out = tq;
                *near_out = near;
                *sd_out = s1 / cnt - d;
                return 1;
            }
        }
        double tn = t + (s2 - sqrt(s2)) / s1;
        if (!(tn > t)) return 0;
        t = tn;
        if (it < 2) { /* entries <= t - margin are out of the support and far from tau */
            const float thr = (float)(t - DROP_MARGIN);
#if HAVE_X86
            c = avx512 ? drop_avx512(cand, c, thr) : drop_generic(cand, c, thr);
#else
            c = drop_generic(cand, c, thr);
#endif
        }
    }
    return 0;
}

CLONES
static void output(float *yr, int64_t n, float tf) {
    for (int64_t j = 0; j < n; ++j) {
        float d = yr[j] - tf;
        d = d > 0.0f ? d : 0.0f;
        yr[j] = d * d;
    }
}

/* 1.5-entmax of `rows` contiguous rows of length n; flag[r] = 1 where row r must be redone
   exactly; returns the number of flagged rows, or -1 if out of memory */
static int64_t entmax15_rows(const float *x, float *y, uint8_t *flag, int64_t rows, int64_t n) {
    float *cand = (float *)malloc((size_t)(n + 16) * sizeof(float));
    if (!cand) return -1;
    int avx512 = 0;
#if HAVE_X86 && !defined(ENTMAX15_GENERIC)
    __builtin_cpu_init();
    avx512 = __builtin_cpu_supports("avx512f");
#endif
    int64_t nflag = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        float m;
        int64_t c;
        double s[2];
#if HAVE_X86
        if (avx512) {
            m = row_max_avx512(xr, n);
            c = z_compact_avx512(xr, yr, cand, n, m, s);
        } else
#endif
        {
            m = row_max_generic(xr, n);
            c = z_compact_generic(xr, yr, cand, n, m, s);
        }
        /* one Newton step from t = -1 with the float sums of the pass above, then back off by
           a margin that covers their rounding: t0 is still below tau (solve checks f(t0) >= 0) */
        double t0 = -1.0;
        if (s[0] > 0.0 && s[1] > 1.0) {
            double t1 = -1.0 + (s[1] - sqrt(s[1])) / s[0] - DROP_MARGIN;
            if (t1 > t0) {
                t0 = t1;
                const float thr = (float)(t0 - DROP_MARGIN);
#if HAVE_X86
                c = avx512 ? drop_avx512(cand, c, thr) : drop_generic(cand, c, thr);
#else
                c = drop_generic(cand, c, thr);
#endif
            }
        }
        double tau = -1.0, near = 0.0, sd = 1.0;
        int ok = solve(cand, c, avx512, t0, &tau, &near, &sd);
        output(yr, n, (float)tau);
        uint8_t f = !(ok && near > 2e-6 + 1e-6 / sd);
        flag[r] = f;
        nflag += f;
    }
    free(cand);
    return nflag;
}

#ifdef _OPENMP
/* Rows go in chunks to the threads of the OpenMP runtime torch itself runs on (the kernel is
   built with OpenMP only where torch ships GNU OpenMP, so the same libgomp.so.1 is loaded
   once): its workers, still spinning after torch's last parallel op, take chunks at once,
   instead of a new thread competing with them for the core. */
#include <omp.h>
int64_t entmax15(const float *x, float *y, uint8_t *flag, int64_t rows, int64_t n, int64_t threads,
                 int64_t chunk) {
    int64_t n_chunks = (rows + chunk - 1) / chunk, flagged = 0;
    int oom = 0;
#pragma omp parallel for num_threads((int)threads) schedule(dynamic, 1) \
    reduction(+ : flagged) reduction(| : oom) if (threads > 1)
    for (int64_t i = 0; i < n_chunks; ++i) {
        int64_t a = i * chunk, b = a + chunk < rows ? a + chunk : rows;
        int64_t got = entmax15_rows(x + a * n, y + a * n, flag + a, b - a, n);
        if (got < 0) oom = 1; else flagged += got;
    }
    return oom ? -1 : flagged;
}
#else
/* Rows are handed out in chunks through an atomic counter to the calling thread and
   threads - 1 detached helpers. The caller returns as soon as every chunk is done: a helper
   that a busy machine schedules late finds no chunk left and exits, without holding it up.
   The job lives on the heap until its last thread drops it. */
typedef struct {
    const float *x;
    float *y;
    uint8_t *flag;
    int64_t rows, n, chunk, n_chunks, next, done, flagged, refs;
} job_t;

static void drop_job(job_t *job) {
    if (__atomic_sub_fetch(&job->refs, 1, __ATOMIC_ACQ_REL) == 0) free(job);
}

static void work(job_t *job) {
    for (;;) {
        int64_t i = __atomic_fetch_add(&job->next, 1, __ATOMIC_ACQ_REL);
        if (i >= job->n_chunks) break;
        int64_t a = i * job->chunk, b = a + job->chunk < job->rows ? a + job->chunk : job->rows;
        int64_t got = entmax15_rows(job->x + a * job->n, job->y + a * job->n, job->flag + a, b - a, job->n);
        if (got < 0) got = job->rows + 1; /* out of memory: more than every row */
        __atomic_fetch_add(&job->flagged, got, __ATOMIC_ACQ_REL);
        __atomic_fetch_add(&job->done, 1, __ATOMIC_ACQ_REL);
    }
}

static void *helper(void *arg) {
    work((job_t *)arg);
    drop_job((job_t *)arg);
    return NULL;
}

int64_t entmax15(const float *x, float *y, uint8_t *flag, int64_t rows, int64_t n, int64_t threads,
                 int64_t chunk) {
    job_t *job = (job_t *)malloc(sizeof(job_t));
    if (!job) return -1;
    *job = (job_t){x, y, flag, rows, n, chunk, (rows + chunk - 1) / chunk, 0, 0, 0, 1};
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int64_t t = 1; t < threads; ++t) {
        pthread_t tid;
        __atomic_add_fetch(&job->refs, 1, __ATOMIC_ACQ_REL);
        if (pthread_create(&tid, &attr, helper, job) != 0) __atomic_sub_fetch(&job->refs, 1, __ATOMIC_ACQ_REL);
    }
    pthread_attr_destroy(&attr);
    work(job);
    while (__atomic_load_n(&job->done, __ATOMIC_ACQUIRE) < job->n_chunks) sched_yield();
    int64_t flagged = __atomic_load_n(&job->flagged, __ATOMIC_ACQUIRE);
    drop_job(job);
    return flagged > rows ? -1 : flagged;
}
#endif

/* Flagged rows, redone with entmax15's own float32 arithmetic (entmax.activations: z = (x - max)/2,
   a full descending sort, prefix means with float64 running sums rounded to float as torch's cumsum
   does, ss, delta, clamp) up to the square root, which the caller takes with torch.sqrt (torch's
   vectorised sqrt is not correctly rounded, so it cannot be reproduced here); fixup_finish then
   does the rest. Only +, -, *, / and comparisons, each rounded to float as torch rounds it (built
   with -ffp-contract=off): the same bits as entmax15. */
static int desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

static float row_max_plain(const float *xr, int64_t n) {
    float m = xr[0];
    for (int64_t j = 1; j < n; ++j) m = xr[j] > m ? xr[j] : m;
    return m;
}

void fixup_prepare(const float *x, const int64_t *idx, int64_t nf, int64_t n, float *zs, float *mean,
                   float *delta) {
    for (int64_t i = 0; i < nf; ++i) {
        const float *xr = x + idx[i] * n;
        float *zr = zs + i * n, *mr = mean + i * n, *dr = delta + i * n;
        float m = row_max_plain(xr, n);
        for (int64_t j = 0; j < n; ++j) zr[j] = (xr[j] - m) / 2.0f;
        qsort(zr, (size_t)n, sizeof(float), desc);
        double c1 = 0.0, c2 = 0.0;
        for (int64_t j = 0; j < n; ++j) {
            float rho = (float)(j + 1);
            c1 += (double)zr[j];
            c2 += (double)(zr[j] * zr[j]);
            float mu = (float)c1 / rho, mu2 = (float)c2 / rho;
            float ss = rho * (mu2 - mu * mu);
            float d = (1.0f - ss) / rho;
            mr[j] = mu;
            dr[j] = (d != d) ? d : (d < 0.0f ? 0.0f : d); /* torch.clamp keeps NaN */
        }
    }
}

/* p of each flagged row from tau = mean - sqrt(delta); bad[i] = 1 where the support is empty
   (a NaN row), left to entmax15 itself */
void fixup_finish(const float *x, const int64_t *idx, int64_t nf, int64_t n, const float *zs,
                  const float *mean, const float *root, float *y, uint8_t *bad) {
    for (int64_t i = 0; i < nf; ++i) {
        const float *xr = x + idx[i] * n, *zr = zs + i * n, *mr = mean + i * n, *rr = root + i * n;
        float *yr = y + idx[i] * n;
        int64_t support = 0;
        for (int64_t j = 0; j < n; ++j) support += (mr[j] - rr[j]) <= zr[j];
        bad[i] = support == 0;
        if (!support) continue;
        float tau = mr[support - 1] - rr[support - 1];
        float m = row_max_plain(xr, n);
        for (int64_t j = 0; j < n; ++j) {
            float d = (xr[j] - m) / 2.0f - tau;
            d = (d != d) ? d : (d < 0.0f ? 0.0f : d);
            yr[j] = d * d;
        }
    }
}
"""
_CFLAGS = ["-O3", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-pthread"]


def _torch_gnu_openmp() -> bool:
    """Whether torch runs on GNU OpenMP from its own ``libgomp.so.1``.

    Only then does a kernel built with ``-fopenmp`` share torch's thread pool (the dynamic
    loader resolves ``libgomp.so.1`` to the copy torch loaded); another runtime would add a
    second pool of threads competing with torch's.
    """
    lib = Path(torch.__file__).parent / "lib"
    return (lib / "libgomp.so.1").exists() and "OpenMP" in torch.__config__.parallel_info()


def _kernel_dir() -> Path:
    env = os.environ.get("SPARSEFINDER_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "sparsefinder") / "kernels"


@functools.lru_cache(maxsize=4)
def load_kernel(generic: bool = False, openmp: bool | None = None) -> ctypes.CDLL | None:
    """The compiled library (``entmax15``, ``fixup_*``; built on first use, then cached on disk), or ``None``.

    ``generic``: the plain-C build without AVX-512 (what CPUs without it run; for tests).
    ``openmp``: threads from torch's OpenMP pool (``None``: where :func:`_torch_gnu_openmp`,
    unless ``SPARSEFINDER_ENTMAX_OPENMP=0``), else the kernel's own POSIX threads; a compiler
    without OpenMP falls back to the latter.
    """
    if os.environ.get("SPARSEFINDER_ENTMAX_KERNEL", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    if openmp is None:
        openmp = os.environ.get("SPARSEFINDER_ENTMAX_OPENMP", "1") != "0" and _torch_gnu_openmp()
    base = [*_CFLAGS, "-DENTMAX15_GENERIC"] if generic else list(_CFLAGS)
    builds = [[*base, "-fopenmp"], base] if openmp else [base]
    for flags in builds:
        fn = _build(cc, flags)
        if fn is not None:
            return fn
    return None


def _build(cc: str, flags: list[str]) -> ctypes.CDLL | None:
    key = hashlib.sha256((_C_SOURCE + " ".join(flags) + cc).encode()).hexdigest()[:16]
    for folder in (_kernel_dir(), Path(tempfile.gettempdir()) / "sparsefinder-kernels"):
        lib = folder / f"entmax15-{key}.so"
        try:
            if not lib.exists():
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=folder) as tmp:
                    c_file, so_file = Path(tmp) / "entmax15.c", Path(tmp) / "entmax15.so"
                    c_file.write_text(_C_SOURCE)
                    subprocess.run([cc, *flags, "-o", str(so_file), str(c_file)], check=True, capture_output=True)
                    os.replace(so_file, lib)  # atomic: concurrent builders all end with a whole file
            so = ctypes.CDLL(str(lib))
        except (OSError, subprocess.CalledProcessError):
            continue
        so.entmax15.restype = ctypes.c_int64
        so.entmax15.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
        so.fixup_prepare.restype = None
        so.fixup_prepare.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3
        so.fixup_finish.restype = None
        so.fixup_finish.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 5
        return so
    return None


def kernel_available() -> bool:
    """Whether the compiled sort-free kernel is in use for float32 CPU tensors."""
    return load_kernel() is not None
