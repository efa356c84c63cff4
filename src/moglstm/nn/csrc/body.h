/* Included by moglstm.c once per precision, with T, SUF, EXP, LIM, GEMM and IS_F32 defined.
 *
 * exp's argument is clamped to +-LIM (exp(LIM) stays finite): under -ffast-math the division
 * may become a reciprocal estimate and a Newton step, which turns 1 / inf into NaN. The clamp
 * changes nothing visible: sigmoid is below 1e-34 there. NaN still propagates.
 * tanh is written as 2 sigmoid(2x) - 1 so that the loops need only exp and vectorise.
 */
#define CLAMP(x) ((x) < -LIM ? -LIM : ((x) > LIM ? LIM : (x)))
#define SIG(x) ((T)1 / ((T)1 + EXP(-CLAMP(x))))
#define TANH(x) ((T)2 * SIG((T)2 * (x)) - (T)1)
/* BIASED is a compile-time constant in every loop that uses this (a run-time test on the
   pointer inside the loop kept the LSTM kernel from vectorising well: 4-5x slower here) */
#define BIAS(p, j) (BIASED ? (p)[j] : (T)0)

/* The variant flags are compile-time constants in each call of these bodies, so every
   variant gets its own branch-free loop that vectorises. */
#define INL static inline __attribute__((always_inline))
#define R_ __restrict__

/* ---------------------------------------------------------------- pointwise kernels */

/* gates: (B, G*Hs) pre-activations in (plus bias, if given), activations out; G = 3 (f, g, o)
   if coupled. Hs is the hidden size (the gates' spacing, the row stride of c and h); the
   kernels run on n units, with every pointer already at the first one. */
INL void FN(lstm_fwd_body)(int64_t B, int64_t n, int64_t Hs, T *R_ gates, const T *R_ c_prev, T *R_ c,
                           T *R_ h, const T *R_ pi, const T *R_ pf, const T *R_ po,
                           const T *R_ bias, const int COUPLED, const int CAP, const int PEEP,
                           const int BIASED) {
    const int64_t G = COUPLED ? 3 : 4;
    const T *R_ bi = bias;
    const T *R_ bf = bias ? bias + (COUPLED ? 0 : Hs) : 0;
    const T *R_ bg = bias ? bf + Hs : 0;
    const T *R_ bo = bias ? bg + Hs : 0;
    for (int64_t b = 0; b < B; b++) {
        T *R_ zi = gates + b * G * Hs;
        T *R_ zf = zi + (COUPLED ? 0 : Hs);
        T *R_ zg = zf + Hs;
        T *R_ zo = zg + Hs;
        const T *R_ cp = c_prev + b * Hs;
        T *R_ cn = c + b * Hs;
        T *R_ hn = h + b * Hs;
#pragma GCC ivdep
        for (int64_t j = 0; j < n; j++) {
            T f = SIG(zf[j] + BIAS(bf, j) + (PEEP ? pf[j] * cp[j] : (T)0));
            T g = TANH(zg[j] + BIAS(bg, j));
            T m;
            if (COUPLED) {
                m = (T)1 - f;
            } else {
                T i = SIG(zi[j] + BIAS(bi, j) + (PEEP ? pi[j] * cp[j] : (T)0));
                m = CAP ? ((T)1 - f < i ? (T)1 - f : i) : i;
                zi[j] = i;
            }
            T cv = f * cp[j] + m * g;
            T o = SIG(zo[j] + BIAS(bo, j) + (PEEP ? po[j] * cv : (T)0));
            zf[j] = f;
            zg[j] = g;
            zo[j] = o;
            cn[j] = cv;
            hn[j] = o * TANH(cv);
        }
    }
}

void FN(lstm_fwd)(int64_t B, int64_t n, int64_t Hs, T *gates, const T *c_prev, T *c, T *h, const T *pi,
                  const T *pf, const T *po, int coupled, int cap, const T *bias) {
    int peep = pf != 0;
#define CALL(C, K, P)                                                                         \
    do {                                                                                      \
        if (bias)                                                                             \
            FN(lstm_fwd_body)(B, n, Hs, gates, c_prev, c, h, pi, pf, po, bias, C, K, P, 1);   \
        else                                                                                  \
            FN(lstm_fwd_body)(B, n, Hs, gates, c_prev, c, h, pi, pf, po, bias, C, K, P, 0);   \
    } while (0)
    DISPATCH_VARIANTS(CALL, coupled, cap, peep);
#undef CALL
}

/* gates: activations in, pre-activation gradients out; dc: dc_t in, dc_{t-1} out;
   tanh(c_t) is recomputed from c_t rather than stored */
INL void FN(lstm_bwd_body)(int64_t B, int64_t n, int64_t Hs, T *R_ gates, const T *R_ c_prev,
                           const T *R_ c_new, const T *R_ dh, T *R_ dc, const T *R_ pi,
                           const T *R_ pf, const T *R_ po, const int COUPLED, const int CAP,
                           const int PEEP) {
    const int64_t G = COUPLED ? 3 : 4;
    for (int64_t b = 0; b < B; b++) {
        T *R_ ai = gates + b * G * Hs;
        T *R_ af = ai + (COUPLED ? 0 : Hs);
        T *R_ ag = af + Hs;
        T *R_ ao = ag + Hs;
        const T *R_ cp = c_prev + b * Hs;
        const T *R_ cn = c_new + b * Hs;
        const T *R_ dhb = dh + b * Hs;
        T *R_ dcb = dc + b * Hs;
#pragma GCC ivdep
        for (int64_t j = 0; j < n; j++) {
            T o = ao[j], t = TANH(cn[j]), f = af[j], g = ag[j], d = dhb[j];
            T dzo = d * t * o * ((T)1 - o);
            T dcn = dcb[j] + d * o * ((T)1 - t * t) + (PEEP ? dzo * po[j] : (T)0);
            T df, dg, dzi = (T)0;
            if (COUPLED) {
                df = dcn * (cp[j] - g);
                dg = dcn * ((T)1 - f);
            } else {
                T i = ai[j];
                if (CAP) {
                    T a = (T)1 - f;
                    /* d min(a, i): to the smaller, split evenly on ties (as torch) */
                    T to_a = a < i ? (T)1 : (a == i ? (T)0.5 : (T)0);
                    T dm = dcn * g;
                    df = dcn * cp[j] - dm * to_a;
                    dzi = dm * ((T)1 - to_a) * i * ((T)1 - i);
                    dg = dcn * (a < i ? a : i);
                } else {
                    df = dcn * cp[j];
                    dzi = dcn * g * i * ((T)1 - i);
                    dg = dcn * i;
                }
                ai[j] = dzi;
            }
            T dzf = df * f * ((T)1 - f);
            af[j] = dzf;
            ag[j] = dg * ((T)1 - g * g);
            ao[j] = dzo;
            dcb[j] = dcn * f + (PEEP ? dzf * pf[j] : (T)0) +
                     ((PEEP && !COUPLED) ? dzi * pi[j] : (T)0);
        }
    }
}

void FN(lstm_bwd)(int64_t B, int64_t n, int64_t Hs, T *gates, const T *c_prev, const T *c_new,
                  const T *dh, T *dc, const T *pi, const T *pf, const T *po, int coupled,
                  int cap) {
    int peep = pf != 0;
#define CALL(C, K, P)                                                                         \
    FN(lstm_bwd_body)(B, n, Hs, gates, c_prev, c_new, dh, dc, pi, pf, po, C, K, P)
    DISPATCH_VARIANTS(CALL, coupled, cap, peep);
#undef CALL
}

/* s: (R, C) pre-activation in (plus bias, if given), sigmoid out; new = 2 s old
   (row strides so, sn) */
INL void FN(round_fwd_body)(int64_t R, int64_t C, T *R_ s, const T *R_ bias, const T *R_ old,
                            int64_t so, T *R_ nw, int64_t sn, const int BIASED) {
    for (int64_t r = 0; r < R; r++) {
        T *R_ sr = s + r * C;
        const T *R_ orow = old + r * so;
        T *R_ nrow = nw + r * sn;
        for (int64_t j = 0; j < C; j++) {
            T v = SIG(sr[j] + BIAS(bias, j));
            sr[j] = v;
            nrow[j] = (T)2 * v * orow[j];
        }
    }
}

void FN(round_fwd)(int64_t R, int64_t C, T *s, const T *bias, const T *old, int64_t so, T *nw,
                   int64_t sn) {
    if (bias)
        FN(round_fwd_body)(R, C, s, bias, old, so, nw, sn, 1);
    else
        FN(round_fwd_body)(R, C, s, bias, old, so, nw, sn, 0);
}

/* s: pre-activation z in (plus bias, if given), dz out; with v = sigmoid(z):
   d_old = 2 v d_new. d_old may be d_new itself (each element is read before written). */
INL void FN(round_bwd_body)(int64_t R, int64_t C, T *R_ s, const T *R_ bias, const T *R_ old,
                            int64_t so, const T *dnew, int64_t sd, T *dold, int64_t sdo,
                            const int BIASED) {
    for (int64_t r = 0; r < R; r++) {
        T *R_ sr = s + r * C;
        T *dor = dold + r * sdo;
        const T *R_ orow = old + r * so;
        const T *drow = dnew + r * sd;
#pragma GCC ivdep
        for (int64_t j = 0; j < C; j++) {
            T v = SIG(sr[j] + BIAS(bias, j)), dn = drow[j];
            dor[j] = (T)2 * v * dn;
            sr[j] = (T)2 * orow[j] * dn * v * ((T)1 - v);
        }
    }
}

void FN(round_bwd)(int64_t R, int64_t C, T *s, const T *bias, const T *old, int64_t so,
                   const T *dnew, int64_t sd, T *dold, int64_t sdo) {
    if (bias)
        FN(round_bwd_body)(R, C, s, bias, old, so, dnew, sd, dold, sdo, 1);
    else
        FN(round_bwd_body)(R, C, s, bias, old, so, dnew, sd, dold, sdo, 0);
}

/* ---------------------------------------------------------------- matrix products */

/* y (m, n) = x (m, k) op(w) + beta y; op(w) = w^T with w (n, k) if trans, else w (k, n);
   ld: w's row stride */
typedef struct {
    const T *w;
    int n, k, trans, ld;
    float *packed; /* MKL's packed copy of w for exactly m rows (float only), or NULL */
} FN(lin);

static int FN(lin_init)(FN(lin) *l, const Blas *b, const void *w, int64_t n, int64_t k,
                        int trans, int64_t ld, int m) {
    l->w = (const T *)w;
    l->n = (int)n;
    l->k = (int)k;
    l->trans = trans;
    l->ld = (int)ld;
    l->packed = NULL;
#if IS_F32
    /* MKL's packing costs about one product at 64 rows but seven at one row (measured) */
    if (b->pack && b->compute && b->pack_size && n > 0 && k > 0 && m >= 8) {
        l->packed = malloc(b->pack_size(B_MATRIX, m, l->n, l->k));
        if (!l->packed) return 1;
        b->pack(ROW_MAJOR, B_MATRIX, trans ? TRANS : NO_TRANS, m, l->n, l->k, 1.0f, l->w, l->ld,
                l->packed);
    }
#else
    (void)b;
    (void)m;
#endif
    return 0;
}

static void FN(lin_free)(FN(lin) *l) {
    free(l->packed);
    l->packed = NULL;
}

static void FN(lin_apply)(const FN(lin) *l, const Blas *b, int m, const T *x, int64_t ldx, T *y,
                          int64_t ldy, T beta) {
    const int lx = (int)ldx, ly = (int)ldy;
    if (m == 0 || l->n == 0) return;
#if IS_F32
    if (l->packed) {
        b->compute(ROW_MAJOR, NO_TRANS, PACKED, m, l->n, l->k, x, lx, l->packed, l->ld, beta, y,
                   ly);
        return;
    }
#endif
    /* column-major: y^T (n, m) = op(w)^T (n, k) x^T (k, m) */
    const T one = 1;
    b->GEMM(l->trans ? "T" : "N", "N", &l->n, &m, &l->k, &one, l->w, &l->ld, x, &lx, &beta, y,
            &ly);
}

/* y (n1, n2) += a^T x over m rows: a (m, n1; lda), x (m, n2; ldx) */
static void FN(acc_outer)(const Blas *b, int m, int64_t n1, int64_t n2, const T *a, int64_t lda,
                          const T *x, int64_t ldx, T *y) {
    const int i1 = (int)n1, i2 = (int)n2, la = (int)lda, lx = (int)ldx;
    const T one = 1;
    /* column-major: y^T (n2, n1) += x^T (n2, m) a (m, n1) */
    b->GEMM("N", "T", &i2, &i1, &m, &one, x, &lx, a, &la, &one, y, &i2);
}

/* ---------------------------------------------------------------- the step loop */

/* y = a * mask (or a copy), m rows of n; mask rows are n apart */
static void FN(mul_rows)(int64_t m, int64_t n, const T *a, int64_t lda, const T *mask, T *y,
                         int64_t ldy) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++)
            y[i * ldy + j] = mask ? a[i * lda + j] * mask[i * n + j] : a[i * lda + j];
}

static void FN(add_rows)(int64_t m, int64_t n, const T *a, int64_t lda, T *y, int64_t ldy) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) y[i * ldy + j] += a[i * lda + j];
}

/* y (n) += the column sums of a (m rows of n, row stride lda) */
static void FN(acc_colsum)(int64_t m, int64_t n, const T *a, int64_t lda, T *y) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) y[j] += a[i * lda + j];
}

/* Step t of a (T, B, .) buffer with row stride ld: this thread's first row, or row 0 */
#define AT(base, ld, t) ((T *)(base) + ((t) * L->B + tm->b0) * (ld))
#define AT0(base, ld, t) ((T *)(base) + (t) * L->B * (ld))

/* One thread's products. Rounds, on its batch rows: in (low rank: v -> u), out (-> z, also
   recomputed in backward), back_u (dz -> du), back_v (du or dz -> dv). Gates, on all rows:
   forward, one product per gate (i, f, g, o) for the thread's hidden units; backward, the
   thread's columns of d[x_m, h_m]. */
typedef struct {
    FN(lin) * in, *out, *back_u, *back_v;
    FN(lin) gates[4];
} FN(ops);

static void FN(ops_free)(FN(ops) *o, int64_t R) {
    for (int64_t r = 0; r < R && o->in && o->out && o->back_u && o->back_v; r++) {
        FN(lin_free)(&o->in[r]);
        FN(lin_free)(&o->out[r]);
        FN(lin_free)(&o->back_u[r]);
        FN(lin_free)(&o->back_v[r]);
    }
    for (int g = 0; g < 4; g++) FN(lin_free)(&o->gates[g]);
    free(o->in);
    free(o->out);
    free(o->back_u);
    free(o->back_v);
}

static int FN(ops_init)(FN(ops) *o, const Layer *L, const Blas *b, const Team *tm,
                        int backward) {
    const int64_t R = L->rounds, n = R ? R : 1, m = tm->m, H = L->H;
    const int64_t width = R ? L->I + H : H; /* the gates' input: [x_m, h_m], or h */
    Blas few = *b; /* packing pays for itself over a few steps, not one or two */
    if (L->steps < 4) few.pack = NULL;
    b = &few;
    int err = 0;
    memset(o, 0, sizeof *o);
    o->in = calloc(n, sizeof *o->in);
    o->out = calloc(n, sizeof *o->out);
    o->back_u = calloc(n, sizeof *o->back_u);
    o->back_v = calloc(n, sizeof *o->back_v);
    if (!o->in || !o->out || !o->back_u || !o->back_v) return 1;
    for (int64_t r = 0; r < R; r++) {
        /* odd rounds (r even here, counting from 0) gate x (I) by h (H); even ones h by x */
        const int64_t out = r % 2 == 0 ? L->I : H, in = r % 2 == 0 ? H : L->I;
        const int64_t k = L->low_rank ? L->rank[r] : in;
        err |= FN(lin_init)(&o->out[r], b, L->w_left[r], out, k, 1, k, m);
        if (L->low_rank && !backward)
            err |= FN(lin_init)(&o->in[r], b, L->w_right[r], k, in, 1, in, m);
        if (L->low_rank && backward) {
            err |= FN(lin_init)(&o->back_u[r], b, L->w_left[r], k, out, 0, k, m);
            err |= FN(lin_init)(&o->back_v[r], b, L->w_right[r], in, k, 0, in, m);
        } else if (backward) {
            err |= FN(lin_init)(&o->back_v[r], b, L->w_left[r], in, out, 0, in, m);
        }
    }
    const T *w = (const T *)L->w_gates;
    if (backward) {
        err |= FN(lin_init)(&o->gates[0], b, w + tm->c0, tm->nc, L->G, 0, width, (int)L->B);
    } else {
        for (int64_t g = 0; g < L->G / H; g++)
            err |= FN(lin_init)(&o->gates[g], b, w + (g * H + tm->u0) * width, tm->nu, width, 1,
                                width, (int)L->B);
    }
    return err;
}

/* Which versions of x and h round r reads and writes: the gated vector's version before the
   round (tgt; after it: tgt + 1) and the gating vector's (src). */
static void FN(slots)(int64_t R, int64_t *tgt, int64_t *src) {
    int64_t xi = 0, hi = 0;
    for (int64_t r = 0; r < R; r++) {
        tgt[r] = r % 2 == 0 ? xi++ : hi++;
        src[r] = r % 2 == 0 ? hi : xi;
    }
}

/* Step t's rounds on this thread's rows; writes every version of x and h */
static void FN(forward_rounds)(const Layer *L, const Blas *b, const FN(ops) *o, const Team *tm,
                               int64_t t, const int64_t *tgt, const int64_t *src, T *s) {
    const int m = (int)tm->m;
    const int64_t H = L->H;
    const T *h_prev = t == 0 ? (const T *)L->h0 + tm->b0 * H : AT(L->out, H, t - 1);
    const T *mask = L->mask ? (const T *)L->mask + tm->b0 * H : NULL;
    FN(mul_rows)(m, H, h_prev, H, mask, AT(L->hs[0], L->hs_ld[0], t), L->hs_ld[0]);
    for (int64_t r = 0; r < L->rounds; r++) {
        const int odd = r % 2 == 0;
        void *const *gated = odd ? L->xs : L->hs, *const *gating = odd ? L->hs : L->xs;
        const int64_t *gated_ld = odd ? L->xs_ld : L->hs_ld;
        const int64_t *gating_ld = odd ? L->hs_ld : L->xs_ld;
        const int64_t C = odd ? L->I : H;
        const T *v = AT(gating[src[r]], gating_ld[src[r]], t);
        int64_t ldv = gating_ld[src[r]];
        if (L->low_rank) {
            T *u = AT(L->u[r], L->rank[r], t);
            FN(lin_apply)(&o->in[r], b, m, v, ldv, u, L->rank[r], 0);
            v = u;
            ldv = L->rank[r];
        }
        FN(lin_apply)(&o->out[r], b, m, v, ldv, s, C, 0);
        FN(round_fwd)(m, C, s, (const T *)L->w_bias[r], AT(gated[tgt[r]], gated_ld[tgt[r]], t),
                      gated_ld[tgt[r]], AT(gated[tgt[r] + 1], gated_ld[tgt[r] + 1], t),
                      gated_ld[tgt[r] + 1]);
    }
}

/* Step t's gates and cell update for this thread's hidden units, on all rows */
static void FN(forward_gates)(const Layer *L, const Blas *b, const FN(ops) *o, const Team *tm,
                              int64_t t) {
    const int64_t H = L->H, G = L->G, R = L->rounds, u0 = tm->u0;
    T *g = AT0(L->gates, G, t);
    /* the gates' input: the last x version starts the (T, B, I + H) buffer [x_m, h_m]; with no
       rounds, h (and gates[t] already holds the input projection) */
    const int64_t last = (R + 1) / 2, ld = R ? L->I + H : L->hs_ld[0];
    const T *in = R ? AT0(L->xs[last], ld, t) : AT0(L->hs[0], ld, t);
    for (int64_t k = 0; k < G / H; k++)
        FN(lin_apply)(&o->gates[k], b, (int)L->B, in, ld, g + k * H + u0, G, R ? 0 : 1);
    if (tm->nu == 0) return;
#define OFF(p) ((p) ? (const T *)(p) + u0 : NULL)
    FN(lstm_fwd)(L->B, tm->nu, H, g + u0, AT0(L->c, H, t) + u0, AT0(L->c, H, t + 1) + u0,
                 AT0(L->out, H, t) + u0, OFF(L->peep_i), OFF(L->peep_f), OFF(L->peep_o),
                 (int)L->coupled, (int)L->cap, R ? OFF(L->bias) : NULL);
}

/* Thread `thread` of `threads` runs steps 0 .. T-1: the rounds on batch rows b0 .. b1-1, the
   gates on its share of the hidden units; a barrier after each phase. Returns 0, or 1 when
   some thread ran out of memory. */
int FN(mog_forward)(const Layer *L, const Blas *b, int64_t b0, int64_t b1, int64_t thread,
                    int64_t threads) {
    Team tm = team(L, b0, b1, thread, threads);
    const int64_t R = L->rounds, n = R ? R : 1, width = L->I > L->H ? L->I : L->H;
    const int previous = b->set_threads_local ? b->set_threads_local(1) : 0;
    int64_t *tgt = calloc(n, sizeof *tgt), *src = calloc(n, sizeof *src);
    T *s = malloc(sizeof(T) * tm.m * width);
    FN(ops) o;
    int err = FN(ops_init)(&o, L, b, &tm, 0) || !tgt || !src || !s;
    err = team_agree_on_error(&tm, err);
    if (!err) {
        FN(slots)(R, tgt, src);
        for (int64_t t = 0; t < L->steps; t++) {
            FN(forward_rounds)(L, b, &o, &tm, t, tgt, src, s);
            team_barrier(&tm);
            FN(forward_gates)(L, b, &o, &tm, t);
            team_barrier(&tm);
        }
    }
    FN(ops_free)(&o, R);
    free(tgt);
    free(src);
    free(s);
    if (b->set_threads_local) b->set_threads_local(previous);
    return err;
}

/* Back through step t's rounds on this thread's rows: dxh holds [d x_m, d h_m] (rows of
   I + H) and ends holding d h_{t-1} (before the state mask) in its h half; the input's
   gradient goes to L->dx, the rounds' weight gradients into this thread's accumulators. */
static void FN(rounds_backward)(const Layer *L, const Blas *b, const FN(ops) *o, const Team *tm,
                                int64_t t, const int64_t *tgt, const int64_t *src, T *dxh, T *z,
                                T *du, T *dv) {
    const int m = (int)tm->m;
    const int64_t I = L->I, H = L->H, W = I + H, thread = tm->tid;
    for (int64_t r = L->rounds - 1; r >= 0; r--) {
        const int odd = r % 2 == 0;
        void *const *gated = odd ? L->xs : L->hs, *const *gating = odd ? L->hs : L->xs;
        const int64_t *gated_ld = odd ? L->xs_ld : L->hs_ld;
        const int64_t *gating_ld = odd ? L->hs_ld : L->xs_ld;
        const int64_t C = odd ? I : H, in = odd ? H : I;
        const int64_t k = L->low_rank ? L->rank[r] : in;
        T *d_new = odd ? dxh : dxh + I; /* gradient of the gated vector after the round */
        T *d_other = odd ? dxh + I : dxh;
        const T *v = AT(gating[src[r]], gating_ld[src[r]], t);
        const T *u = L->low_rank ? AT(L->u[r], k, t) : NULL;
        /* the round's pre-activation, recomputed from u (or v) */
        if (L->low_rank)
            FN(lin_apply)(&o->out[r], b, m, u, k, z, C, 0);
        else
            FN(lin_apply)(&o->out[r], b, m, v, gating_ld[src[r]], z, C, 0);
        /* round 1 yields the input's gradient; the others overwrite d_new in place */
        T *d_old = r == 0 ? AT(L->dx, I, t) : d_new;
        FN(round_bwd)(m, C, z, (const T *)L->w_bias[r], AT(gated[tgt[r]], gated_ld[tgt[r]], t),
                      gated_ld[tgt[r]], d_new, W, d_old, r == 0 ? I : W);
        /* z now holds dz: the round's weight gradients over this step's rows */
        T *g_left = (T *)L->gw_left[r] + thread * C * k;
        if (L->low_rank) {
            FN(lin_apply)(&o->back_u[r], b, m, z, C, du, k, 0);
            FN(lin_apply)(&o->back_v[r], b, m, du, k, dv, in, 0);
            FN(acc_outer)(b, m, C, k, z, C, u, k, g_left);
            FN(acc_outer)(b, m, k, in, du, k, v, gating_ld[src[r]],
                          (T *)L->gw_right[r] + thread * k * in);
        } else {
            FN(lin_apply)(&o->back_v[r], b, m, z, C, dv, in, 0);
            FN(acc_outer)(b, m, C, in, z, C, v, gating_ld[src[r]], g_left);
        }
        if (L->gw_bias[r]) FN(acc_colsum)(m, C, z, C, (T *)L->gw_bias[r] + thread * C);
        FN(add_rows)(m, in, dv, in, d_other, W); /* the gating vector's gradient */
    }
}

/* Step t's cell update backward for this thread's hidden units, on all rows: dh, dc in/out */
static void FN(backward_cell)(const Layer *L, const Team *tm, int64_t t) {
    const int64_t H = L->H, G = L->G, u0 = tm->u0, nu = tm->nu;
    T *g = AT0(L->gates, G, t), *dh = (T *)L->dh + u0, *dc = (T *)L->dc + u0;
    if (nu == 0) return;
    if (L->d_out) FN(add_rows)(L->B, nu, AT0(L->d_out, H, t) + u0, H, dh, H);
    FN(lstm_bwd)(L->B, nu, H, g + u0, AT0(L->c, H, t) + u0, AT0(L->c, H, t + 1) + u0, dh, dc,
                 OFF(L->peep_i), OFF(L->peep_f), OFF(L->peep_o), (int)L->coupled, (int)L->cap);
    for (int64_t k = 0; L->g_bias && k < G / H; k++)
        FN(acc_colsum)(L->B, nu, g + k * H + u0, G, (T *)L->g_bias + tm->tid * G + k * H + u0);
}

/* Thread `thread` of `threads` runs steps t_hi-1 down to t_lo, with L->dh, L->dc carrying the
   gradients between calls: the cell update on its hidden units, d[x_m, h_m] on its columns
   (into the shared L->work, B rows of I + H), the rounds on batch rows b0 .. b1-1; a barrier
   after each phase. Weight gradients go to slice `thread` of the accumulators. Returns 0, or 1
   when some thread ran out of memory. */
int FN(mog_backward)(const Layer *L, const Blas *b, int64_t b0, int64_t b1, int64_t thread,
                     int64_t threads, int64_t t_hi, int64_t t_lo) {
    Team tm = team(L, b0, b1, thread, threads);
    const int64_t R = L->rounds, n = R ? R : 1, H = L->H, G = L->G, W = L->I + H;
    const int previous = b->set_threads_local ? b->set_threads_local(1) : 0;
    int64_t *tgt = calloc(n, sizeof *tgt), *src = calloc(n, sizeof *src);
    int64_t k_max = 1;
    for (int64_t r = 0; L->low_rank && r < R; r++) k_max = L->rank[r] > k_max ? L->rank[r] : k_max;
    T *dv = malloc(sizeof(T) * tm.m * W), *z = malloc(sizeof(T) * tm.m * W);
    T *du = malloc(sizeof(T) * tm.m * k_max);
    T *dxh = (T *)L->work, *dh = (T *)L->dh + tm.b0 * H;
    const T *mask = L->mask ? (const T *)L->mask + tm.b0 * H : NULL;
    FN(ops) o;
    int err = FN(ops_init)(&o, L, b, &tm, 1) || !tgt || !src || !dv || !z || !du;
    err = team_agree_on_error(&tm, err);
    if (!err) FN(slots)(R, tgt, src);
    for (int64_t t = t_hi - 1; !err && t >= t_lo; t--) {
        FN(backward_cell)(L, &tm, t);
        team_barrier(&tm);
        T *g = AT0(L->gates, G, t);
        if (R)
            FN(lin_apply)(&o.gates[0], b, (int)L->B, g, G, dxh + tm.c0, W, 0);
        else
            FN(lin_apply)(&o.gates[0], b, (int)L->B, g, G, (T *)L->dh + tm.c0, H, 0);
        team_barrier(&tm);
        if (R) {
            FN(rounds_backward)(L, b, &o, &tm, t, tgt, src, dxh + tm.b0 * W, z, du, dv);
            FN(mul_rows)(tm.m, H, dxh + tm.b0 * W + L->I, W, mask, dh, H);
        } else if (mask) {
            FN(mul_rows)(tm.m, H, dh, H, mask, dh, H);
        }
        team_barrier(&tm);
    }
    FN(ops_free)(&o, R);
    free(tgt);
    free(src);
    free(dv);
    free(z);
    free(du);
    if (b->set_threads_local) b->set_threads_local(previous);
    return err;
}

/* 1 when the BLAS entry points multiply a small matrix right (packed and plain), else 0:
   guards against a BLAS whose integer width or layout is not the one assumed here. */
int FN(blas_check)(const Blas *b) {
    const T w[6] = {1, 2, 3, 4, 5, 6}; /* (n=3, k=2) */
    const T x[4] = {1, -1, 2, 0.5};     /* (m=2, k=2) */
    const T want[6] = {-1, -1, -1, 3, 8, 13};
    T y[6] = {0};
    int ok = 1;
    for (int packed = 0; packed < 2; packed++) {
        Blas plain = *b;
        if (!packed) plain.pack = NULL;
        FN(lin) l;
        if (FN(lin_init)(&l, &plain, w, 3, 2, 1, 2, 2)) return 0;
        FN(lin_apply)(&l, &plain, 2, x, 2, y, 3, 0);
        FN(lin_free)(&l);
        for (int i = 0; i < 6; i++) ok &= y[i] == want[i];
    }
    return ok;
}

#undef OFF
#undef AT0

#undef AT
#undef CLAMP
#undef SIG
#undef TANH
#undef BIAS
#undef INL
#undef R_
