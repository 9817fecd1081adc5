/* --simulate's store: a temporary copy of the real one, so a dry run
 * starts from the target's real state (its version, its instances) and
 * writes nothing to it. */
#ifndef DEPLOY_SIMULATE_H
#define DEPLOY_SIMULATE_H

#include <stddef.h>

/* Makes a temporary directory (removed when the process exits) holding
 * state.db: a copy of the SQLite store at `state` when that file exists
 * (SQLite's online backup: a running deployctl may be writing it), an
 * empty store otherwise (a PostgreSQL URL: its history is not copied).
 * out: the copy's path; note: what the simulation starts from, for
 * people. -1 with err when the copy cannot be made. */
int simulate_store_copy(const char *state, char *out, size_t size, char *note, size_t nsize, char *err);

#endif
