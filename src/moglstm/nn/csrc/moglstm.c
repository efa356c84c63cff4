/* The fused path's CPU code: pointwise kernels and the compiled step loop.
 *
 * body.h holds everything once, written for a scalar type T with names
 * suffixed by SUF; it is included here for float (f32) and double (f64).
 * Plain C with no torch headers, so it builds in about a second with the system
 * compiler (see moglstm/nn/_kernels.py, which also calls it through ctypes).
 *
 * Matrix products go to the BLAS inside libtorch_cpu (MKL on x86 builds of
 * torch), whose entry points Python looks up and passes in a Blas struct: this
 * library links against nothing but libm.
 */
#include <math.h>
#include <stddef.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Fortran gemm: column-major, arguments by pointer, 32-bit integers (MKL's LP64) */
typedef void (*gemm_fn)(const char *, const char *, const int *, const int *, const int *,
                        const void *, const void *, const int *, const void *, const int *,
                        const void *, void *, const int *);
/* MKL's packed single-precision API and its per-thread thread count */
typedef size_t (*pack_size_fn)(int, int, int, int);
typedef void (*pack_fn)(int, int, int, int, int, int, float, const float *, int, float *);
typedef void (*compute_fn)(int, int, int, int, int, int, const float *, int, const float *, int,
                           float, float *, int);
typedef int (*threads_fn)(int);

typedef struct {
    gemm_fn sgemm, dgemm;
    pack_size_fn pack_size; /* these three may be NULL: plain gemm then */
    pack_fn pack;
    compute_fn compute;
    threads_fn set_threads_local; /* may be NULL */
} Blas;

/* CBLAS enum values (MKL's mkl_cblas.h) */
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, PACKED = 151, B_MATRIX = 162 };

/* One layer direction: sizes, weights and the (T, B, .) buffers of fused.py's Buffers.
 * Pointers are void so that one struct serves both precisions. Versions of x and h
 * (xs[v], hs[v]) have their own row stride (ld): the last ones are halves of xh. */
typedef struct {
    int64_t steps, B, I, H, G; /* G: gate rows, 4H (3H if coupled) */
    int64_t rounds, low_rank, coupled, cap;
    const int64_t *rank;  /* per round, low rank only */
    void *const *w_left;  /* per round: W (out, in), or left (out, k) if low rank */
    void *const *w_right; /* per round, low rank: right (k, in) */
    void *const *w_bias;  /* per round: bias (out) or NULL */
    const void *w_gates;  /* rounds: [W_ih W_hh] (G, I + H); no rounds: W_hh (G, H) */
    const void *bias;     /* (G) or NULL; with no rounds it is already in gates */
    const void *peep_i, *peep_f, *peep_o; /* (H) each, or NULL */
    void *const *xs;
    const int64_t *xs_ld;
    void *const *hs;
    const int64_t *hs_ld;
    void *const *u; /* per round, low rank: (T, B, k) */
    void *gates;    /* (T, B, G) */
    void *c;        /* (T + 1, B, H) */
    void *out;      /* (T, B, H) */
    const void *h0, *mask; /* (B, H); mask may be NULL */
    /* backward only */
    const void *d_out; /* (T, B, H) contiguous, or NULL */
    void *dh, *dc;     /* (B, H): gradient of h_t, c_t in; of h_{t-1}, c_{t-1} out */
    void *dx;          /* (T, B, I): the input's gradient (rounds only) */
    /* weight gradients, accumulated by each thread into its own slice (index `thread`) */
    void *const *gw_left;  /* per round: (threads, out, k), or (threads, out, in) full rank */
    void *const *gw_right; /* per round, low rank: (threads, k, in) */
    void *const *gw_bias;  /* per round: (threads, out) or NULL */
    void *g_bias;          /* (threads, G) or NULL: the gates' bias */
    void *work;            /* (B, I + H): d[x_m, h_m] of a step, shared by the threads */
    int *sync;             /* 4 zeroed ints: the threads' barrier */
} Layer;

/* The layout of the structs Python builds through ctypes, reported so that its loader
   (moglstm/nn/_kernels.py) can compare them with its own mirrors and refuse to call into a
   library whose structs differ. Field lists in declaration order. */
#define LAYER_FIELDS(X)                                                                       \
    X(steps) X(B) X(I) X(H) X(G) X(rounds) X(low_rank) X(coupled) X(cap) X(rank) X(w_left)    \
    X(w_right) X(w_bias) X(w_gates) X(bias) X(peep_i) X(peep_f) X(peep_o) X(xs) X(xs_ld)      \
    X(hs) X(hs_ld) X(u) X(gates) X(c) X(out) X(h0) X(mask) X(d_out) X(dh) X(dc) X(dx)         \
    X(gw_left) X(gw_right) X(gw_bias) X(g_bias) X(work) X(sync)
#define BLAS_FIELDS(X) X(sgemm) X(dgemm) X(pack_size) X(pack) X(compute) X(set_threads_local)

typedef struct {
    const char *name;
    int64_t offset;
} Field;

#define LAYER_FIELD(f) {#f, (int64_t)offsetof(Layer, f)},
#define BLAS_FIELD(f) {#f, (int64_t)offsetof(Blas, f)},
static const Field layer_fields[] = {LAYER_FIELDS(LAYER_FIELD)};
static const Field blas_fields[] = {BLAS_FIELDS(BLAS_FIELD)};

/* Struct `which` (0: Layer, 1: Blas): writes its size, and up to `cap` field names and
   offsets; returns the number of fields (-1 for an unknown struct). */
int64_t mog_struct_layout(int64_t which, int64_t *size, const char **names, int64_t *offsets,
                          int64_t cap) {
    const Field *fields = which == 0 ? layer_fields : blas_fields;
    const int64_t n = which == 0 ? (int64_t)(sizeof layer_fields / sizeof *layer_fields)
                                 : (int64_t)(sizeof blas_fields / sizeof *blas_fields);
    if (which != 0 && which != 1) return -1;
    *size = which == 0 ? (int64_t)sizeof(Layer) : (int64_t)sizeof(Blas);
    for (int64_t i = 0; i < n && i < cap; i++) {
        names[i] = fields[i].name;
        offsets[i] = fields[i].offset;
    }
    return n;
}

/* What one thread of a call works on: batch rows b0 .. b0+m-1 (the rounds), hidden units
   u0 .. u0+nu-1 (the gates, forward and backward cell update) and columns c0 .. c0+nc-1 of
   d[x_m, h_m] (backward); its barrier sense. */
typedef struct {
    int64_t tid, nth, b0, m, u0, nu, c0, nc;
    int *sync;
    int sense;
} Team;

/* An even share of `total` for thread `tid` of `nth`, in blocks of `align` (SIMD width) */
static void share(int64_t total, int64_t nth, int64_t tid, int64_t align, int64_t *lo,
                  int64_t *n) {
    const int64_t chunk = ((total + nth - 1) / nth + align - 1) / align * align;
    const int64_t start = tid * chunk < total ? tid * chunk : total;
    *lo = start;
    *n = (start + chunk < total ? start + chunk : total) - start;
}

static Team team(const Layer *L, int64_t b0, int64_t b1, int64_t tid, int64_t nth) {
    Team tm = {tid, nth, b0, b1 - b0, 0, 0, 0, 0, L->sync, 0};
    share(L->H, nth, tid, 16, &tm.u0, &tm.nu);
    share(L->rounds ? L->I + L->H : L->H, nth, tid, 16, &tm.c0, &tm.nc);
    return tm;
}

/* Spin on a plain load, without PAUSE: in a virtual machine a PAUSE loop can exit to the
   hypervisor (measured here: 10% slower at B=16, H=256) */
#define CPU_RELAX() __asm__ __volatile__("" ::: "memory")

/* A sense-reversing spin barrier for the threads of one call. sync[0] counts arrivals,
   sync[1] is the shared sense, sync[2] an error flag, sync[3] set by Python when it could
   not start every thread (the waiting ones then give up): Python hands in zeroed memory. */
static void team_barrier(Team *tm) {
    if (tm->nth <= 1) return;
    int *sync = tm->sync;
    tm->sense ^= 1;
    if (__atomic_add_fetch(&sync[0], 1, __ATOMIC_ACQ_REL) == tm->nth) {
        __atomic_store_n(&sync[0], 0, __ATOMIC_RELAXED);
        __atomic_store_n(&sync[1], tm->sense, __ATOMIC_RELEASE);
        return;
    }
    for (int spins = 0; __atomic_load_n(&sync[1], __ATOMIC_ACQUIRE) != tm->sense; spins++) {
        if (__atomic_load_n(&sync[3], __ATOMIC_ACQUIRE)) {
            __atomic_store_n(&sync[2], 1, __ATOMIC_RELEASE); /* abandoned: report an error */
            return;
        }
        if (spins > 2000)
            sched_yield(); /* a descheduled partner would otherwise cost us whole slices */
        else
            CPU_RELAX();
    }
}

/* Whether any thread failed to set up: every thread learns it at the same barrier */
static int team_agree_on_error(Team *tm, int err) {
    if (err) __atomic_store_n(&tm->sync[2], 1, __ATOMIC_RELEASE);
    team_barrier(tm);
    return __atomic_load_n(&tm->sync[2], __ATOMIC_ACQUIRE);
}


/* CALL(coupled, cap, peephole) with the three flags as compile-time constants, so that each
   variant of a kernel gets its own branch-free loop (coupled and cap never come together) */
#define DISPATCH_VARIANTS(CALL, coupled, cap, peep)                                           \
    do {                                                                                      \
        if (coupled) {                                                                        \
            if (peep) CALL(1, 0, 1); else CALL(1, 0, 0);                                      \
        } else if (cap) {                                                                     \
            if (peep) CALL(0, 1, 1); else CALL(0, 1, 0);                                      \
        } else {                                                                              \
            if (peep) CALL(0, 0, 1); else CALL(0, 0, 0);                                      \
        }                                                                                     \
    } while (0)

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUF)

#define T float
#define SUF f32
#define EXP expf
#define LIM 80.0f
#define GEMM sgemm
#define IS_F32 1
#include "body.h"
#undef T
#undef SUF
#undef EXP
#undef LIM
#undef GEMM
#undef IS_F32

#define T double
#define SUF f64
#define EXP exp
#define LIM 700.0
#define GEMM dgemm
#define IS_F32 0
#include "body.h"
