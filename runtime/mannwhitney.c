#include "mannwhitney.h"

#include <math.h>
#include <stdlib.h>

typedef struct ranked {
  double v;
  int from_x;
} ranked;

static int by_value(const void *a, const void *b) {
  double x = ((const ranked *)a)->v, y = ((const ranked *)b)->v;
  return (x > y) - (x < y);
}

static int by_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

double mw_median(double *v, size_t n) {
  qsort(v, n, sizeof *v, by_double);
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

int mw_test(const double *x, size_t nx, const double *y, size_t ny, mw_result *out) {
  size_t n = nx + ny;
  ranked *all = malloc(n * sizeof *all);
  if (!all)
    return -1;
  for (size_t i = 0; i < nx; i++)
    all[i] = (ranked){x[i], 1};
  for (size_t i = 0; i < ny; i++)
    all[nx + i] = (ranked){y[i], 0};
  qsort(all, n, sizeof *all, by_value);
  /* Ranks from 1; a run of ties shares the mean of its ranks. */
  double rank_x = 0, ties = 0;
  for (size_t i = 0; i < n;) {
    size_t j = i;
    while (j + 1 < n && all[j + 1].v == all[i].v)
      j++;
    double t = (double)(j - i + 1), mean_rank = (double)(i + j) / 2 + 1;
    for (size_t k = i; k <= j; k++)
      if (all[k].from_x)
        rank_x += mean_rank;
    ties += t * t * t - t;
    i = j + 1;
  }
  free(all);
  double fx = (double)nx, fy = (double)ny, fn = (double)n;
  out->u = rank_x - fx * (fx + 1) / 2;
  double mean = fx * fy / 2;
  double var = fx * fy / 12 * ((fn + 1) - (fn > 1 ? ties / (fn * (fn - 1)) : 0));
  if (!(var > 0)) {
    out->p_greater = out->p_less = 1;
    return 0;
  }
  double sd = sqrt(var);
  /* P(U >= u) and P(U <= u), each with the continuity correction of 1/2. */
  out->p_greater = 0.5 * erfc((out->u - mean - 0.5) / sd / sqrt(2.0));
  out->p_less = 0.5 * erfc((mean - out->u - 0.5) / sd / sqrt(2.0));
  if (out->p_greater > 1)
    out->p_greater = 1;
  if (out->p_less > 1)
    out->p_less = 1;
  return 0;
}
