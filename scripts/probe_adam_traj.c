/* 25 float32 Adam steps (changing lr) of 200000 parameters in three arithmetics,
 * against the same steps with float64 state: the largest distance of p, m and v,
 * in float32 ulps of the largest magnitude each element has had since step 1
 * (tests/test_optim_torch.py's measure). Parameters span 1e-2..1e2 and each
 * step's gradients 1e-3..1e3, so some p land near zero after a step as large as
 * themselves (p - step cancels).
 *
 *   gcc -O2 -march=native -ffp-contract=off scripts/probe_adam_traj.c -o /tmp/adam_traj -lm
 *   /tmp/adam_traj
 *
 * f64-math: bncore's kernel (float64 arithmetic, one rounding per stored value);
 * comp32: probe_adam_arith.c's comp32; f32: torch-like float32 throughout.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define N 200000
#define STEPS 25
#define KINDS 3

typedef struct { float p[N], m[N], v[N]; } State32;

static double P[N], M[N], V[N];           /* the float64 trajectory */
static double maxp[N], maxm[N], maxv[N];  /* largest magnitudes so far */
static State32 s32[KINDS];
static float G[STEPS][N];

static double uniform(void) { return (rand() + 0.5) / (RAND_MAX + 1.0); }
static double gauss(void) { return sqrt(-2 * log(uniform())) * cos(6.283185307179586 * uniform()); }

/* |a - ref| in ulps of the float32 nearest `scale` */
static double ulps(float a, double ref, double scale) {
    float s = (float)scale;
    return fabs((double)a - ref) / (nextafterf(s, INFINITY) - s);
}

int main(void) {
    const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
    const float b1h = (float)b1, b1l = (float)(b1 - b1h), c1h = (float)(1 - b1);
    const float c1l = (float)((1 - b1) - c1h), b2h = (float)b2, b2l = (float)(b2 - b2h);
    const float c2h = (float)(1 - b2), c2l = (float)((1 - b2) - c2h);
    const char *names[KINDS] = {"f64-math(bncore)", "comp32", "f32(torch-like)"};
    double worst[KINDS][3] = {{0}};
    srand(1);
    for (int i = 0; i < N; i++) {
        float x = (float)(gauss() * pow(10, uniform() * 4 - 2));
        P[i] = x;
        for (int k = 0; k < KINDS; k++) s32[k].p[i] = x;
    }
    for (int t = 0; t < STEPS; t++)
        for (int i = 0; i < N; i++) G[t][i] = (float)(gauss() * pow(10, uniform() * 6 - 3));
    for (int t = 1; t <= STEPS; t++) {
        double lr = 1e-3 * (1 + 0.5 * sin(t)), bc1 = 1 - pow(b1, t), bc2 = 1 - pow(b2, t);
        double step = lr / bc1, kc = 1 / sqrt(bc2);
        float fstep = (float)step, fkc = (float)kc, feps = (float)eps;
        float tb1 = (float)b1, tb2 = (float)b2;
        float tbc1 = 1 - powf(tb1, (float)t), tbc2 = 1 - powf(tb2, (float)t);
        for (int i = 0; i < N; i++) {
            double g = G[t - 1][i];
            float gr = G[t - 1][i], gg = gr * gr;
            State32 *a = &s32[0], *b = &s32[1], *c = &s32[2];
            M[i] = b1 * M[i] + (1 - b1) * g;
            V[i] = b2 * V[i] + (1 - b2) * g * g;
            P[i] = P[i] - step * M[i] / (sqrt(V[i]) * kc + eps);
            {   /* f64-math */
                double mm = b1 * a->m[i] + (1 - b1) * g, vv = b2 * a->v[i] + (1 - b2) * g * g;
                a->m[i] = (float)mm;
                a->v[i] = (float)vv;
                a->p[i] = (float)(a->p[i] - step * mm / (sqrt(vv) * kc + eps));
            }
            {   /* comp32 */
                float mi = b->m[i], vi = b->v[i];
                float mm = fmaf(b1h, mi, fmaf(c1h, gr, fmaf(b1l, mi, c1l * gr)));
                float vv = fmaf(b2h, vi, fmaf(c2h, gg, fmaf(b2l, vi, c2l * gg)));
                b->m[i] = mm;
                b->v[i] = vv;
                b->p[i] = b->p[i] - (fstep * mm) / fmaf(sqrtf(vv), fkc, feps);
            }
            {   /* f32 */
                c->m[i] = tb1 * c->m[i] + (1 - tb1) * gr;
                c->v[i] = tb2 * c->v[i] + (1 - tb2) * gg;
                c->p[i] = c->p[i] - ((float)lr / tbc1) * c->m[i] / (sqrtf(c->v[i]) / sqrtf(tbc2) + feps);
            }
            maxp[i] = fmax(maxp[i], fabs(P[i]));
            maxm[i] = fmax(maxm[i], fabs(M[i]));
            maxv[i] = fmax(maxv[i], fabs(V[i]));
            for (int k = 0; k < KINDS; k++) {
                worst[k][0] = fmax(worst[k][0], ulps(s32[k].p[i], P[i], maxp[i]));
                worst[k][1] = fmax(worst[k][1], ulps(s32[k].m[i], M[i], maxm[i]));
                worst[k][2] = fmax(worst[k][2], ulps(s32[k].v[i], V[i], maxv[i]));
            }
        }
    }
    printf("max ulp from float64 after %d steps (p / m / v):\n", STEPS);
    for (int k = 0; k < KINDS; k++)
        printf(" %-17s %9.2f / %7.2f / %7.2f\n", names[k], worst[k][0], worst[k][1], worst[k][2]);
    return 0;
}
