/* The Mann-Whitney U test, as Kayenta's judge uses it to compare a
 * canary's metric with its baseline's: does one sample tend to hold larger
 * values than the other? It needs no assumption about the distribution,
 * which suits latencies (skewed, with a long tail). */
#ifndef DEPLOY_MANNWHITNEY_H
#define DEPLOY_MANNWHITNEY_H

#include <stddef.h>

typedef struct mw_result {
  double u;          /* U of x: pairs (x_i, y_j) with x_i > y_j, ties counting one half */
  double p_greater;  /* one-sided p-value of "x tends to be larger than y" */
  double p_less;     /* one-sided p-value of "x tends to be smaller than y" */
} mw_result;

/* Normal approximation with a tie correction and a continuity correction
 * (as Apache Commons Math, which Kayenta uses, and scipy's
 * mannwhitneyu(method="asymptotic")). nx, ny >= 1; -1 when out of memory.
 * All values equal: both p-values are 1. */
int mw_test(const double *x, size_t nx, const double *y, size_t ny, mw_result *out);

/* The median of v (n >= 1); v is sorted in place. */
double mw_median(double *v, size_t n);

#endif
