#include "instset.h"

#include <stdlib.h>
#include <string.h>

#include "util.h"

int instset_push(instset *s, const store_instance *in) {
  if (s->n == s->cap) {
    size_t cap = s->cap ? s->cap * 2 : 8;
    store_instance *g = realloc(s->v, cap * sizeof *g);
    if (!g)
      return -1;
    s->v = g;
    s->cap = cap;
  }
  s->v[s->n++] = *in;
  return 0;
}

void instset_clear(instset *s) {
  free(s->v);
  memset(s, 0, sizeof *s);
}

int instset_split(const store_instance *rows, size_t n, const char *live_deployment, instset *live, instset *others) {
  for (size_t i = 0; i < n; i++) {
    int is_live = live_deployment[0] && strcmp(rows[i].deployment_id, live_deployment) == 0 &&
                  strcmp(rows[i].state, "stopped") != 0;
    if (instset_push(is_live ? live : others, &rows[i]) != 0)
      return -1;
  }
  return 0;
}

size_t instset_servers(const instset *s, int weight, router_server *out) {
  for (size_t i = 0; i < s->n; i++) {
    memset(&out[i], 0, sizeof out[i]);
    dc_strlcpy(out[i].name, s->v[i].server, sizeof out[i].name);
    dc_strlcpy(out[i].host, s->v[i].host, sizeof out[i].host);
    out[i].port = s->v[i].port;
    out[i].weight = weight;
  }
  return s->n;
}

static json_t *instance_json(const store_instance *in) {
  return json_pack("{s:o, s:i, s:o, s:o, s:i, s:i, s:s}", "version", dc_json_text(in->version), "instance", in->idx,
                   "node", dc_json_text(in->node), "host", dc_json_text(in->host), "port", in->port, "pid", in->pid,
                   "server", in->server);
}

/* ---- a job: many instances, one callback ---- */

typedef struct job {
  instset_ctx c;
  instset *into;       /* start: the set grown */
  instset set;         /* stop, inspect: our copy */
  const char *version;
  int pending;
  size_t dead;
  unsigned char *alive;  /* inspect: one flag per instance of set */
  char err[DC_ERR_MAX];
  instset_cb cb;
  instset_alive_cb alive_cb;
  void *payload;
} job;

typedef struct slot {
  job *j;
  size_t i;            /* index in the set */
} slot;

static job *job_new(const instset_ctx *c, instset_cb cb, void *payload, char *err) {
  job *j = calloc(1, sizeof *j);
  if (!j) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return NULL;
  }
  j->c = *c;
  j->cb = cb;
  j->payload = payload;
  j->pending = 1; /* held until every step is issued */
  return j;
}

static void job_fail(job *j, const char *err) {
  if (!j->err[0])
    dc_strlcpy(j->err, err ? err : "failed", sizeof j->err);
}

static void job_done(job *j) {
  if (--j->pending > 0)
    return;
  if (j->alive_cb)
    j->alive_cb(j->payload, j->alive, j->dead, j->err[0] ? j->err : NULL);
  else
    j->cb(j->payload, j->err[0] ? j->err : NULL);
  instset_clear(&j->set);
  free(j->alive);
  free(j);
}

static slot *slot_new(job *j, size_t i) {
  slot *s = malloc(sizeof *s);
  if (!s) {
    job_fail(j, "deploy: out of memory");
    return NULL;
  }
  s->j = j;
  s->i = i;
  j->pending++;
  return s;
}

/* ---- start ---- */

static store_instance *row_of(slot *s) { return &s->j->into->v[s->i]; }

static void start_updated(void *payload, const store_result *r) {
  slot *s = payload;
  job *j = s->j;
  if (r->rc != DC_OK)
    job_fail(j, r->err);
  else if (strcmp(row_of(s)->state, "running") == 0)
    record_event(j->c.rc, "instance_started", instance_json(row_of(s)));
  free(s);
  job_done(j);
}

static void update_row(slot *s) {
  char err[DC_ERR_MAX];
  if (store_instance_update(s->j->c.s, row_of(s), start_updated, s, err) != 0) {
    job_fail(s->j, err);
    job_done(s->j);
    free(s);
  }
}

/* An instance that could not start: its row says stopped, so that its
 * port counts as free and whoever cleans up knows there is nothing to
 * signal. */
static void start_failed(slot *s, const char *err) {
  job_fail(s->j, err);
  dc_strlcpy(row_of(s)->state, "stopped", sizeof row_of(s)->state);
  update_row(s);
}

static void started(void *payload, const provider_instance *pi, const char *err) {
  slot *s = payload;
  store_instance *in = row_of(s);
  engine_release(s->j->c.e);
  if (!pi) {
    start_failed(s, err);
    return;
  }
  dc_strlcpy(in->host, pi->host, sizeof in->host);
  in->port = pi->port;
  dc_strlcpy(in->handle, pi->handle, sizeof in->handle);
  in->pid = pi->pid;
  in->pid_start = pi->pid_start;
  dc_strlcpy(in->log_path, pi->log_path, sizeof in->log_path);
  in->started_at = pi->started_at;
  dc_strlcpy(in->state, "running", sizeof in->state);
  update_row(s);
}

static void ports_read(void *payload, const store_result *r) {
  slot *s = payload;
  job *j = s->j;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK) {
    start_failed(s, r->err);
    return;
  }
  provider *p = j->c.t->provider;
  provider_start_req req = {.inst = row_of(s), .taken = r->ports, .ntaken = r->nports};
  /* A process takes as long to start on the virtual clock as on the real
   * one: time waits for it. */
  engine_hold(j->c.e);
  if (p->start(p, &req, started, s, err) != 0) {
    engine_release(j->c.e);
    start_failed(s, err);
  }
}

static void added(void *payload, const store_result *r) {
  slot *s = payload;
  job *j = s->j;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK) {
    /* Never recorded, so never started: it leaves the set. */
    job_fail(j, r->err);
    dc_strlcpy(row_of(s)->state, "stopped", sizeof row_of(s)->state);
    free(s);
    job_done(j);
    return;
  }
  store_instance *in = row_of(s);
  in->id = r->id;
  dc_fmt(in->server, sizeof in->server, "dc_%lld", (long long)in->id);
  if (store_ports_in_use(j->c.s, in->node, ports_read, s, err) != 0)
    start_failed(s, err);
}

int instset_plan(const target_config *t, const char *deployment_id, const char *version, int per_node, int first_idx,
                 instset *out) {
  int idx = first_idx;
  for (size_t node = 0; node < t->nnodes; node++) {
    for (int k = 0; k < per_node; k++) {
      store_instance in;
      memset(&in, 0, sizeof in);
      dc_strlcpy(in.target, t->name, sizeof in.target);
      dc_strlcpy(in.deployment_id, deployment_id, sizeof in.deployment_id);
      dc_strlcpy(in.version, version, sizeof in.version);
      dc_strlcpy(in.node, t->nodes[node], sizeof in.node);
      dc_strlcpy(in.state, "starting", sizeof in.state);
      in.idx = idx++;
      if (instset_push(out, &in) != 0)
        return -1;
    }
  }
  return 0;
}

int instset_start(const instset_ctx *c, instset *into, const instset *templates, instset_cb cb, void *payload,
                  char *err) {
  job *j = job_new(c, cb, payload, err);
  if (!j)
    return -1;
  j->into = into;
  size_t base = into->n;
  for (size_t i = 0; i < templates->n; i++) {
    store_instance in = templates->v[i];
    in.id = 0;
    in.handle[0] = '\0';
    in.pid = 0;
    in.pid_start = 0;
    in.port = 0;
    in.weight = 0;
    dc_strlcpy(in.state, "starting", sizeof in.state);
    if (instset_push(into, &in) != 0) {
      job_fail(j, "deploy: out of memory");
      break;
    }
  }
  for (size_t i = base; i < into->n; i++) {
    slot *s = slot_new(j, i);
    if (!s)
      break;
    if (store_instance_add(c->s, &into->v[i], added, s, err) != 0) {
      job_fail(j, err);
      dc_strlcpy(into->v[i].state, "stopped", sizeof into->v[i].state);
      free(s);
      j->pending--;
    }
  }
  job_done(j);
  return 0;
}

/* ---- stop ---- */

static store_instance *copy_of(slot *s) { return &s->j->set.v[s->i]; }

static void row_deleted(void *payload, const store_result *r) {
  (void)payload;
  (void)r; /* a row left behind is removed by the next reconcile */
}

static void stopped(void *payload, const char *err) {
  slot *s = payload;
  job *j = s->j;
  store_instance *in = copy_of(s);
  char e2[DC_ERR_MAX];
  engine_release(j->c.e);
  if (err) {
    job_fail(j, err);
    record_event(j->c.rc, "stop_failed",
                 json_pack("{s:i, s:i, s:o}", "instance", in->idx, "pid", in->pid, "error", dc_json_text(err)));
  } else {
    store_instance_delete(j->c.s, in->id, row_deleted, NULL, e2);
  }
  record_event(j->c.rc, "instance_stopped", instance_json(in));
  free(s);
  job_done(j);
}

static void marked_stopping(void *payload, const store_result *r) {
  slot *s = payload;
  job *j = s->j;
  char err[DC_ERR_MAX];
  provider *p = j->c.t->provider;
  (void)r; /* a row already gone is stopped all the same */
  engine_hold(j->c.e);
  if (p->stop(p, copy_of(s), stopped, s, err) != 0)
    stopped(s, err);
}

int instset_stop(const instset_ctx *c, const instset *set, instset_cb cb, void *payload, char *err) {
  job *j = job_new(c, cb, payload, err);
  if (!j)
    return -1;
  for (size_t i = 0; i < set->n; i++) {
    if (instset_push(&j->set, &set->v[i]) != 0) {
      job_fail(j, "deploy: out of memory");
      break;
    }
  }
  for (size_t i = 0; i < j->set.n; i++) {
    slot *s = slot_new(j, i);
    if (!s)
      break;
    dc_strlcpy(j->set.v[i].state, "stopping", sizeof j->set.v[i].state);
    if (store_instance_update(c->s, &j->set.v[i], marked_stopping, s, err) != 0) {
      free(s);
      j->pending--;
      job_fail(j, err);
    }
  }
  job_done(j);
  return 0;
}

/* ---- inspect ---- */

static void inspected(void *payload, int alive, const provider_instance *found, const char *err) {
  slot *s = payload;
  job *j = s->j;
  (void)found;
  if (j->alive)
    j->alive[s->i] = alive ? INSTSET_ALIVE : err ? INSTSET_UNKNOWN : INSTSET_DEAD;
  if (!alive) {
    store_instance *in = copy_of(s);
    j->dead++;
    if (!j->err[0] && err)
      dc_fmt(j->err, sizeof j->err, "instance %d of %s on %s: %s", in->idx, in->version,
             in->node[0] ? in->node : "this machine", err);
    else if (!j->err[0])
      dc_fmt(j->err, sizeof j->err, "instance %d of %s (pid %d, port %d) exited; see %s", in->idx, in->version,
             in->pid, in->port, in->log_path[0] ? in->log_path : "its log");
  }
  free(s);
  job_done(j);
}

int instset_inspect(const instset_ctx *c, const instset *set, instset_alive_cb cb, void *payload, char *err) {
  job *j = job_new(c, NULL, payload, err);
  if (!j)
    return -1;
  j->alive_cb = cb;
  j->alive = calloc(set->n + 1, 1);
  if (!j->alive)
    job_fail(j, "deploy: out of memory");
  for (size_t i = 0; j->alive && i < set->n; i++) {
    if (instset_push(&j->set, &set->v[i]) != 0) {
      job_fail(j, "deploy: out of memory");
      break;
    }
  }
  provider *p = c->t->provider;
  for (size_t i = 0; i < j->set.n; i++) {
    slot *s = slot_new(j, i);
    if (!s)
      break;
    if (p->inspect(p, &j->set.v[i], inspected, s, err) != 0)
      inspected(s, 0, NULL, err);
  }
  job_done(j);
  return 0;
}
