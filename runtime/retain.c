#include "retain.h"

#include <stdlib.h>
#include <string.h>

#include "util.h"

typedef struct retain_op {
  service *svc;
  target_config *t;
  store_target tg;
  char **keep, **drop;      /* distinct versions */
  size_t nkeep, ndrop;
  retain_result res;
  dc_buf errors;
  retain_cb cb;
  void *payload;
} retain_op;

static void free_list(char **v, size_t n) {
  for (size_t i = 0; i < n; i++)
    free(v[i]);
  free(v);
}

static void op_end(retain_op *op) {
  op->res.err = op->errors.len ? op->errors.data : op->errors.oom ? "deploy: out of memory" : NULL;
  if (op->cb)
    op->cb(op->payload, &op->res);
  dc_buf_free(&op->errors);
  free_list(op->keep, op->nkeep);
  free_list(op->drop, op->ndrop);
  service_unref(op->svc);
  free(op);
}

static void note(retain_op *op, const char *err) {
  if (err)
    dc_buf_printf(&op->errors, "%s%s", op->errors.len ? "; " : "", err);
}

static int has(char *const *v, size_t n, const char *s) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(v[i], s) == 0)
      return 1;
  return 0;
}

/* Appends a copy of s unless it is there already (or empty). */
static int add(char ***v, size_t *n, const char *s) {
  if (!s[0] || has(*v, *n, s))
    return 0;
  char **g = realloc(*v, (*n + 1) * sizeof *g);
  if (!g)
    return -1;
  *v = g;
  if (!(g[*n] = strdup(s)))
    return -1;
  (*n)++;
  return 0;
}

/* Ends the op when a read it depends on failed (1), or says go on (0). */
static int read_failed(retain_op *op, const store_result *r) {
  if (r->rc == DC_OK)
    return 0;
  note(op, r->err);
  op_end(op);
  return 1;
}

/* A store call that could not even be queued ends the op. */
static void queued(retain_op *op, int rc, const char *err) {
  if (rc == 0)
    return;
  note(op, err);
  op_end(op);
}

static void rows_pruned(void *payload, const store_result *r) {
  retain_op *op = payload;
  if (r->rc != DC_OK)
    note(op, r->err);
  else
    op->res.deployments = (size_t)r->id;
  op_end(op);
}

/* The logs go first: a version whose rows are deleted is a version nobody
 * would look for logs of any more, while the reverse would leave logs no
 * later prune knows the version of. */
static void prune_rows(retain_op *op) {
  char err[DC_ERR_MAX];
  if (store_prune(service_store(op->svc), op->t->name, op->t->retain.history, rows_pruned, op, err) != 0) {
    note(op, err);
    op_end(op);
  }
}

static void logs_pruned(void *payload, size_t removed, size_t rotated, uint64_t freed, const char *err) {
  retain_op *op = payload;
  op->res.logs_removed = removed;
  op->res.logs_rotated = rotated;
  op->res.bytes_freed = freed;
  note(op, err);
  prune_rows(op);
}

static void prune_logs(retain_op *op) {
  char err[DC_ERR_MAX];
  provider *p = op->t->provider;
  uint64_t max = (uint64_t)(op->t->retain.log_mb * 1024.0 * 1024.0);
  if (!p->prune || (op->ndrop == 0 && max == 0)) {
    prune_rows(op);
    return;
  }
  if (p->prune(p, op->t->name, (const char *const *)op->t->nodes, op->t->nnodes, (const char *const *)op->drop,
               op->ndrop, max, logs_pruned, op, err) != 0) {
    note(op, err);
    prune_rows(op);
  }
}

static void instances_read(void *payload, const store_result *r) {
  retain_op *op = payload;
  if (r->rc != DC_OK) {
    /* without them, no version may be called unused */
    note(op, r->err);
    prune_rows(op);
    return;
  }
  int oom = 0;
  for (size_t i = 0; i < r->ninstances; i++)
    oom |= add(&op->keep, &op->nkeep, r->instances[i].version);
  oom |= add(&op->keep, &op->nkeep, op->tg.current_version);
  oom |= add(&op->keep, &op->nkeep, op->tg.previous_version);
  if (oom) {
    note(op, "deploy: out of memory");
    prune_rows(op);
    return;
  }
  /* dropped: every version seen that nothing keeps */
  size_t w = 0;
  for (size_t i = 0; i < op->ndrop; i++) {
    if (has(op->keep, op->nkeep, op->drop[i]))
      free(op->drop[i]);
    else
      op->drop[w++] = op->drop[i];
  }
  op->ndrop = w;
  prune_logs(op);
}

static void history_read(void *payload, const store_result *r) {
  retain_op *op = payload;
  char err[DC_ERR_MAX];
  if (read_failed(op, r))
    return;
  /* newest first: the first `versions` distinct ones are kept, the rest
   * dropped unless something below keeps them */
  char **seen = NULL;
  size_t nseen = 0;
  int oom = 0;
  for (size_t i = 0; i < r->ndeployments; i++) {
    const char *v = r->deployments[i].version;
    if (!v[0] || has(seen, nseen, v))
      continue;
    oom |= add(&seen, &nseen, v);
    oom |= (int)nseen <= op->t->retain.versions ? add(&op->keep, &op->nkeep, v) : 0;
  }
  if (oom) {
    free_list(seen, nseen);
    note(op, "deploy: out of memory");
    op_end(op);
    return;
  }
  /* the keep list grows once the instance rows are read: the drop list is
   * made then, from these */
  op->drop = seen;
  op->ndrop = nseen;
  queued(op, store_instances(service_store(op->svc), op->t->name, instances_read, op, err), err);
}

static void target_read(void *payload, const store_result *r) {
  retain_op *op = payload;
  char err[DC_ERR_MAX];
  if (read_failed(op, r))
    return;
  op->tg = *r->target;
  queued(op, store_history(service_store(op->svc), op->t->name, 0, history_read, op, err), err);
}

int retain_target(service *svc, const char *target, retain_cb cb, void *payload, char *err) {
  target_config *t = service_target(svc, target);
  if (!t) {
    dc_fmt(err, DC_ERR_MAX, "deploy: unknown target '%s'", target);
    return DC_ERROR;
  }
  retain_op *op = calloc(1, sizeof *op);
  if (!op) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  op->svc = service_ref(svc);
  op->t = t;
  op->cb = cb;
  op->payload = payload;
  if (store_target_get(service_store(svc), target, target_read, op, err) != 0) {
    service_unref(svc);
    free(op);
    return DC_ERROR;
  }
  return DC_OK;
}
