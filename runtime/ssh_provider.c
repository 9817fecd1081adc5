/* The ssh provider: instances on other hosts, started, stopped, inspected
 * and read by the remote agent (runtime/ssh_agent.sh, see ssh_agent.h)
 * through the target's ssh connections (runtime/ssh.c: one master per host,
 * commands multiplexed on it).
 *
 * An instance's node is its ssh destination; its handle is
 * "<pid>:<start time>:<boot id>" on that host, which names one process
 * across pid reuse and reboots. Its environment carries
 * DEPLOY_INSTANCE=<tag>, so an instance whose handle was never recorded
 * (deployctl killed while the agent was starting it) is found again by
 * inspect and stop. The tag is "<this machine>:<store path>#<id>" for a
 * store file (two machines may use the same path), "<store URL>#<id>" for a
 * shared database.
 *
 * The address an instance is routed to and health-checked on is the one
 * ssh reached its host on (the agent's hello reads SSH_CONNECTION): with a
 * plain destination or an alias of the ssh config, the address deployctl
 * itself connects to. The first command for a node asks for it; preflight
 * asks every node again before a rollout starts anything.
 *
 * inspect calls made in one loop turn for one node go out as one command
 * (a health round asks about every new instance at once).
 *
 * Secrets: ${NAME} in the command is sent unexpanded; NAME's value (from
 * deployctl's environment, or provider.env) travels on the command's
 * stdin with provider.env, so it never appears in an argv here or there.
 *
 * Remote commands are real work: each holds the virtual clock while it
 * runs. Every callback runs from the loop (ssh.c's callbacks do, and a
 * batch of inspects waits for a zero timer). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* explicit_bzero, gethostname */
#endif

#include "provider.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ssh.h"
#include "ssh_agent.h"
#include "util.h"

#define DEFAULT_LOG_DIR ".deployctl/logs"
#define DEFAULT_CONNECT_TIMEOUT 10.0
#define INSPECT_BATCH_MAX 64
#define EXPAND_MAX 16384
#define ERROR_PREFIX SSH_AGENT_PROTO " error "

typedef struct ssh_provider ssh_provider;
typedef struct node node;
typedef struct op op;

typedef enum { OP_HELLO, OP_START, OP_STOP_FIND, OP_STOP, OP_INSPECT, OP_LOGS, OP_PRUNE } op_kind;

/* One inspect asked for, waiting for its node's next batch. */
typedef struct inspect_req {
  struct inspect_req *next;
  store_instance inst;
  provider_inspect_cb cb;
  void *payload;
} inspect_req;

struct node {
  node *next;
  char *dest;
  char addr[64];       /* where instances are reached, once hello answered */
  char boot[SSH_AGENT_BOOT_ID_LEN + 1];
  int reached;         /* hello answered in this run: commands get the short deadline */
  /* The host failed a command (unreachable, connection lost, ...): other
   * commands fail at once until down_until (uv_now ms), instead of each
   * waiting out its deadline. A hello always tries, and any success ends
   * it. */
  uint64_t down_until;
  char down_err[DC_ERR_MAX];
  int hello_running;
  op *waiting;         /* starts waiting for the address */
  inspect_req *batch, *batch_tail;
};

/* A remote command in flight, or a start waiting for its node's address. */
struct op {
  op *prev, *next;     /* the provider's ops in flight */
  op *wnext;           /* a node's waiting list */
  ssh_provider *p;
  node *n;
  op_kind kind;
  ssh_op *ssh;         /* valid until the ssh callback runs */
  int in_flight;       /* an ssh command (or hello) is out for it */
  int held;            /* holds the virtual clock */
  /* start */
  store_instance inst;
  int *taken;
  size_t ntaken;
  provider_start_cb start_cb;
  /* stop */
  provider_cb cb;
  /* inspect */
  inspect_req *reqs;
  size_t nreqs;
  /* preflight (hello ops share one) */
  struct preflight *pf;
  /* prune (the ops of one prune share one) */
  struct prune_all *pa;
  /* logs */
  provider_stream *stream;
  void *payload;
  op *lnext;           /* the provider's list of ops failed before they ran */
  char late_err[DC_ERR_MAX];
};

struct provider_stream {
  op *o;
  provider_logs_cb cb;
  void *payload;
  int follow;
  int stopped;         /* logs_stop asked: the end is not an error */
  int checked;         /* follow: the first line was seen not to be the agent's error */
  dc_buf head;         /* follow: output held until then */
};

typedef struct preflight {
  ssh_provider *p;
  int pending;
  dc_buf errors;
  provider_cb cb;
  void *payload;
} preflight;

typedef struct prune_all {
  ssh_provider *p;
  int pending;
  size_t removed, rotated;
  uint64_t freed;
  dc_buf errors;
  provider_prune_cb cb;
  void *payload;
} prune_all;

struct ssh_provider {
  provider base;       /* first */
  engine *e;
  ssh_ctx *ssh;
  char *command;
  char *log_dir;
  char *workdir;
  char *tag_prefix;
  char **env;
  int port_min, port_max;
  double stop_timeout, connect_timeout;
  node *nodes;
  op ops;              /* list sentinel */
  uv_timer_t flush;    /* sends the inspect batches, reports the late failures */
  op *late, *late_tail;
  int flush_open;
  int closing;
};

/* ---- small helpers ---- */

static void free_strv(char **v) {
  for (size_t i = 0; v && v[i]; i++)
    free(v[i]);
  free(v);
}

static void wipe_free(char *s) {
  if (!s)
    return;
  explicit_bzero(s, strlen(s));
  free(s);
}

static void destroy(ssh_provider *p) {
  node *n = p->nodes;
  while (n) {
    node *next = n->next;
    free(n->dest);
    free(n);
    n = next;
  }
  free(p->command);
  free(p->log_dir);
  free(p->workdir);
  free(p->tag_prefix);
  free_strv(p->env);
  free(p);
}

static void maybe_destroy(ssh_provider *p) {
  if (p->closing && p->ops.next == &p->ops && !p->flush_open)
    destroy(p);
}

static node *node_get(ssh_provider *p, const char *dest, char *err) {
  for (node *n = p->nodes; n; n = n->next)
    if (strcmp(n->dest, dest) == 0)
      return n;
  if (ssh_validate_dest(dest, err) != 0)
    return NULL;
  node *n = calloc(1, sizeof *n);
  if (!n || !(n->dest = strdup(dest))) {
    free(n);
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return NULL;
  }
  n->next = p->nodes;
  p->nodes = n;
  return n;
}

/* Seconds a command may take: the master's own deadline first (2 x the
 * connect timeout + 5, ssh.c) unless the host answered already in this
 * run, then the work itself. */
static double deadline(const ssh_provider *p, const node *n, double work) {
  double ct = p->connect_timeout;
  return (n->reached ? ct : 2 * ct + 5) + work;
}

static op *op_new(ssh_provider *p, node *n, op_kind kind, char *err) {
  op *o = calloc(1, sizeof *o);
  if (!o) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return NULL;
  }
  o->p = p;
  o->n = n;
  o->kind = kind;
  o->next = &p->ops;
  o->prev = p->ops.prev;
  p->ops.prev->next = o;
  p->ops.prev = o;
  return o;
}

static void op_free(op *o) {
  ssh_provider *p = o->p;
  o->prev->next = o->next;
  o->next->prev = o->prev;
  if (o->held)
    engine_release(p->e);
  inspect_req *r = o->reqs;
  while (r) {
    inspect_req *next = r->next;
    free(r);
    r = next;
  }
  if (o->stream) {
    dc_buf_free(&o->stream->head);
    free(o->stream);
  }
  free(o->taken);
  free(o);
  maybe_destroy(p);
}

static void on_ssh_done(void *payload, const ssh_result *r, const char *err);
static void on_flush(uv_timer_t *t);

#define DOWN_MS 30000

/* o fails with err, from the loop (the flush timer), as if ssh had
 * reported it: never inside the call that started it. */
static void fail_later(op *o, const char *err) {
  ssh_provider *p = o->p;
  dc_strlcpy(o->late_err, err, sizeof o->late_err);
  o->lnext = NULL;
  if (p->late_tail)
    p->late_tail->lnext = o;
  else
    p->late = o;
  p->late_tail = o;
  if (!uv_is_active((uv_handle_t *)&p->flush))
    uv_timer_start(&p->flush, on_flush, 0, 0);
}

/* Runs cmd (freed here) on o's node; input (may be NULL) is wiped and
 * freed here. The outcome always comes through on_ssh_done, from the
 * loop; a command ssh refuses, or one for a host that is down, fails
 * there. Holds the virtual clock until then. */
static void run(op *o, char *cmd, char *input, size_t input_len, double timeout, ssh_output_cb on_output) {
  ssh_provider *p = o->p;
  node *n = o->n;
  char err[DC_ERR_MAX];
  ssh_request req = {.dest = n->dest,
                     .command = cmd,
                     .stdin_data = input,
                     .stdin_len = input_len,
                     .timeout = timeout,
                     .on_output = on_output};
  o->held = 1;
  engine_hold(p->e);
  int down = o->kind != OP_HELLO && n->down_until > uv_now(p->e->loop);
  if (down)
    dc_fmt(err, sizeof err, "%s (it failed %g s ago: not tried again for %d s)", n->down_err,
           (double)(uv_now(p->e->loop) + DOWN_MS - n->down_until) / 1000.0, DOWN_MS / 1000);
  int rc = down ? -1 : ssh_run(&o->ssh, p->ssh, &req, on_ssh_done, o, err);
  free(cmd);
  if (input)
    ssh_agent_free_input(input, input_len);
  if (rc != 0) {
    fail_later(o, err);
    return;
  }
  o->in_flight = 1;
}

/* What a command's outcome says about its host. */
static void note_host(ssh_provider *p, node *n, const ssh_result *r, const char *err) {
  if (!r || r->status == SSH_OK) {
    n->down_until = 0;
    return;
  }
  switch (r->status) {
  case SSH_EHOSTKEY_CHANGED:
  case SSH_EHOSTKEY_UNKNOWN:
  case SSH_EUNREACHABLE:
  case SSH_EAUTH:
  case SSH_ETIMEOUT:
  case SSH_ECONNLOST:
  case SSH_ETRANSPORT:
    n->down_until = uv_now(p->e->loop) + DOWN_MS;
    dc_strlcpy(n->down_err, err ? err : ssh_status_name(r->status), sizeof n->down_err);
    return;
  default:
    return;  /* ours (cancelled, too much output): nothing about the host */
  }
}

/* "<pid>:<start>:<boot>" back into what the agent needs; 0 when the row
 * has no usable handle (never recorded). */
static int parse_handle(const store_instance *in, ssh_agent_instance *out) {
  unsigned long long st = 0;
  int pid = 0, used = 0;
  memset(out, 0, sizeof *out);
  if (!in->handle[0] || sscanf(in->handle, "%d:%llu:%n", &pid, &st, &used) != 2 || used == 0)
    return 0;
  const char *boot = in->handle + used;
  if (pid < 2 || strlen(boot) != SSH_AGENT_BOOT_ID_LEN)
    return 0;
  out->pid = pid;
  out->start_time = st;
  dc_strlcpy(out->boot_id, boot, sizeof out->boot_id);
  return 1;
}

static void tag_of(const ssh_provider *p, const store_instance *in, char *tag, size_t size) {
  dc_fmt(tag, size, "%s#%lld", p->tag_prefix, (long long)in->id);
}

static const char *where(const store_instance *in) { return in->node; }

/* ---- hello: the node's address ---- */

static void start_now(op *o);
static void start_fail(op *o, const char *why);

static void hello_answered(node *n, const char *err) {
  op *w = n->waiting;
  n->waiting = NULL;
  n->hello_running = 0;
  while (w) {
    op *next = w->wnext;
    w->wnext = NULL;
    if (err)
      start_fail(w, err);
    else
      start_now(w);
    w = next;
  }
}

static void preflight_step(preflight *pf, const char *dest, const char *err);

static void hello_done(op *o, const ssh_result *r, const char *err) {
  node *n = o->n;
  char why[DC_ERR_MAX];
  ssh_agent_hello h;
  const char *fail = err;
  if (!fail && ssh_agent_parse_hello(&h, r, why) != 0)
    fail = why;
  if (!fail) {
    dc_strlcpy(n->addr, h.addr, sizeof n->addr);
    dc_strlcpy(n->boot, h.boot_id, sizeof n->boot);
    n->reached = 1;
  }
  if (o->pf)
    preflight_step(o->pf, n->dest, fail);
  else
    hello_answered(n, fail);
}

static int hello_send(ssh_provider *p, node *n, preflight *pf, char *err) {
  char *cmd;
  if (ssh_agent_hello_command(&cmd, err) != 0)
    return -1;
  op *o = op_new(p, n, OP_HELLO, err);
  if (!o) {
    free(cmd);
    return -1;
  }
  o->pf = pf;
  if (!pf)
    n->hello_running = 1;
  run(o, cmd, NULL, 0, deadline(p, n, 5), NULL);
  return 0;
}

/* ---- start ---- */

static void start_fail(op *o, const char *why) {
  char err[DC_ERR_MAX];
  dc_fmt(err, sizeof err, "deploy: cannot start instance %d of %s %s on '%s': %s", o->inst.idx, o->inst.target,
         o->inst.version, where(&o->inst), dc_unprefix(why));
  if (!o->p->closing)
    o->start_cb(o->payload, NULL, err);
  op_free(o);
}

/* Placeholders first, then ${NAME} from our environment (provider.env
 * values: they reach the instance's environment, through stdin). NULL with
 * why filled. */
static char *expand_value(const char *tmpl, const char *const *pairs, const char *what, char *why) {
  char *tmp = malloc(EXPAND_MAX), *out = malloc(EXPAND_MAX), *res = NULL;
  char uerr[DC_ERR_MAX];
  if (!tmp || !out)
    dc_fmt(why, DC_ERR_MAX, "out of memory");
  else if (dc_expand_placeholders(tmp, EXPAND_MAX, tmpl, pairs) != 0)
    dc_fmt(why, DC_ERR_MAX, "%s is longer than %d bytes after placeholder expansion", what, EXPAND_MAX - 1);
  else if (dc_expand_env(out, EXPAND_MAX, tmp, uerr) != 0)
    dc_fmt(why, DC_ERR_MAX, "%s: %s", what, dc_unprefix(uerr));
  else if (!(res = strdup(out)))
    dc_fmt(why, DC_ERR_MAX, "out of memory");
  if (tmp)
    explicit_bzero(tmp, EXPAND_MAX);
  if (out)
    explicit_bzero(out, EXPAND_MAX);
  free(tmp);
  free(out);
  return res;
}

typedef struct env_list {
  char **v;  /* NULL-terminated, wiped when freed */
  size_t n, cap;
} env_list;

static void env_free(env_list *l) {
  for (size_t i = 0; i < l->n; i++)
    wipe_free(l->v[i]);
  free(l->v);
  memset(l, 0, sizeof *l);
}

static int env_has(const env_list *l, const char *name, size_t n) {
  for (size_t i = 0; i < l->n; i++)
    if (strncmp(l->v[i], name, n) == 0 && l->v[i][n] == '=')
      return 1;
  return 0;
}

/* Takes entry ("NAME=value"). */
static int env_add(env_list *l, char *entry) {
  if (!entry)
    return -1;
  if (l->n + 2 > l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 16;
    char **v = realloc(l->v, cap * sizeof *v);
    if (!v) {
      wipe_free(entry);
      return -1;
    }
    l->v = v;
    l->cap = cap;
  }
  l->v[l->n++] = entry;
  l->v[l->n] = NULL;
  return 0;
}

static char *join_entry(const char *name, size_t n, const char *value) {
  size_t vn = strlen(value);
  char *s = malloc(n + 1 + vn + 1);
  if (!s)
    return NULL;
  memcpy(s, name, n);
  s[n] = '=';
  memcpy(s + n + 1, value, vn + 1);
  return s;
}

/* provider.env, expanded; then the value of every ${NAME} of the command
 * that provider.env does not set, from our environment. */
static int build_env(const ssh_provider *p, const char *cmd, const char *const *pairs, env_list *l, char *why) {
  for (size_t i = 0; p->env && p->env[i]; i++) {
    const char *e = p->env[i];
    size_t n = strcspn(e, "=");
    char what[300];
    dc_fmt(what, sizeof what, "provider.env %.*s", (int)n, e);
    char *value = expand_value(e + n + 1, pairs, what, why);
    if (!value)
      return -1;
    char *entry = join_entry(e, n, value);
    wipe_free(value);
    if (env_add(l, entry) != 0) {
      dc_fmt(why, DC_ERR_MAX, "out of memory");
      return -1;
    }
  }
  for (const char *s = strstr(cmd, "${"); s; s = strstr(s + 2, "${")) {
    const char *close = strchr(s + 2, '}');
    if (!close) {
      dc_fmt(why, DC_ERR_MAX, "provider.command has an unterminated '${': write ${NAME}");
      return -1;
    }
    size_t n = (size_t)(close - s - 2);
    char name[128];
    if (n == 0 || n >= sizeof name) {
      dc_fmt(why, DC_ERR_MAX, "provider.command has an empty or too long ${NAME}");
      return -1;
    }
    memcpy(name, s + 2, n);
    name[n] = '\0';
    if (env_has(l, name, n))
      continue;
    const char *value = getenv(name);
    if (!value) {
      dc_fmt(why, DC_ERR_MAX, "environment variable %s is not set (referenced as ${%s} in provider.command): "
             "export it or set it in provider.env", name, name);
      return -1;
    }
    if (env_add(l, join_entry(name, n, value)) != 0) {
      dc_fmt(why, DC_ERR_MAX, "out of memory");
      return -1;
    }
  }
  return 0;
}

static void start_now(op *o) {
  ssh_provider *p = o->p;
  node *n = o->n;
  const store_instance *in = &o->inst;
  char why[DC_ERR_MAX], idx[16], tag[1200], log[1024];
  dc_fmt(idx, sizeof idx, "%d", in->idx);
  /* {port} is the agent's: it picks the port on the host. */
  const char *pairs[] = {"version", in->version, "target", in->target, "instance", idx, "host", n->addr, NULL};
  tag_of(p, in, tag, sizeof tag);
  dc_fmt(log, sizeof log, "%s/%s-%s-%d.log", p->log_dir, in->target, in->version, in->idx);
  env_list env = {0};
  char *cmd = NULL, *input = NULL;
  size_t input_len = 0;
  char *command = dc_expand_placeholders_dup(p->command, pairs);
  int rc = -1;
  if (!command)
    dc_fmt(why, sizeof why, "out of memory");
  else if (build_env(p, command, pairs, &env, why) == 0) {
    ssh_agent_start_req req = {.tag = tag,
                               .version = in->version,
                               .target = in->target,
                               .command = command,
                               .log_path = log,
                               .workdir = p->workdir,
                               .port_min = p->port_min,
                               .port_max = p->port_max,
                               .exclude = o->taken,
                               .nexclude = o->ntaken,
                               .env = (const char *const *)env.v};
    rc = ssh_agent_start_command(&cmd, &input, &input_len, &req, why);
  }
  free(command);
  env_free(&env);
  if (rc != 0) {
    fail_later(o, why);
    return;
  }
  run(o, cmd, input, input_len, deadline(p, n, 30), NULL);
}

static void start_done(op *o, const ssh_result *r, const char *err) {
  char why[DC_ERR_MAX];
  ssh_agent_instance ai;
  if (err) {
    start_fail(o, err);
    return;
  }
  if (ssh_agent_parse_start(&ai, r, why) != 0) {
    start_fail(o, why);
    return;
  }
  provider_instance pi;
  memset(&pi, 0, sizeof pi);
  dc_strlcpy(pi.host, o->n->addr, sizeof pi.host);
  pi.port = ai.port;
  pi.pid = ai.pid;
  pi.pid_start = ai.start_time;
  dc_fmt(pi.handle, sizeof pi.handle, "%d:%llu:%s", ai.pid, (unsigned long long)ai.start_time, ai.boot_id);
  dc_strlcpy(pi.log_path, ai.log_path, sizeof pi.log_path);
  pi.started_at = engine_now(o->p->e);
  if (!o->p->closing)
    o->start_cb(o->payload, &pi, NULL);
  op_free(o);
}

static int sp_start(provider *base, const provider_start_req *req, provider_start_cb cb, void *payload, char *err) {
  ssh_provider *p = (ssh_provider *)base;
  const store_instance *in = req->inst;
  char uerr[DC_ERR_MAX];
  /* target and version become a file name on the host. */
  if (dc_validate_target_name(in->target, uerr) != 0 || dc_validate_version(in->version, "version", uerr) != 0) {
    dc_fmt(err, DC_ERR_MAX, "deploy: cannot start instance %d: %s", in->idx, dc_unprefix(uerr));
    return -1;
  }
  node *n = node_get(p, in->node, err);
  if (!n)
    return -1;
  op *o = op_new(p, n, OP_START, err);
  if (!o)
    return -1;
  o->inst = *in;
  o->start_cb = cb;
  o->payload = payload;
  if (req->ntaken) {
    o->taken = malloc(req->ntaken * sizeof *o->taken);
    if (!o->taken) {
      op_free(o);
      dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
      return -1;
    }
    memcpy(o->taken, req->taken, req->ntaken * sizeof *o->taken);
    o->ntaken = req->ntaken;
  }
  if (n->addr[0]) {
    start_now(o);
    return 0;
  }
  /* The first start on a node learns its address first. */
  o->wnext = n->waiting;
  n->waiting = o;
  if (!n->hello_running && hello_send(p, n, NULL, uerr) != 0)
    hello_answered(n, uerr);
  return 0;
}

/* ---- stop ---- */

static void stop_finish(op *o, const char *why) {
  char err[DC_ERR_MAX];
  if (why)
    dc_fmt(err, sizeof err, "deploy: cannot stop instance %d of %s on '%s': %s", o->inst.idx, o->inst.version,
           where(&o->inst), dc_unprefix(why));
  if (!o->p->closing)
    o->cb(o->payload, why ? err : NULL);
  op_free(o);
}

static void stop_send(op *o, const ssh_agent_instance *ai) {
  char *cmd, why[DC_ERR_MAX];
  o->kind = OP_STOP;
  /* The agent waits stop_timeout, then up to 5 s after SIGKILL. */
  if (ssh_agent_stop_command(&cmd, ai, o->p->stop_timeout, why) != 0) {
    fail_later(o, why);
    return;
  }
  run(o, cmd, NULL, 0, deadline(o->p, o->n, o->p->stop_timeout + 10), NULL);
}

static void inspect_send(ssh_provider *p, node *n, op *o, const ssh_agent_query *q, size_t nq);

static void stop_done(op *o, const ssh_result *r, const char *err) {
  char why[DC_ERR_MAX];
  ssh_agent_stop_result res;
  int pid;
  if (err) {
    stop_finish(o, err);
    return;
  }
  if (o->kind == OP_STOP_FIND) {
    /* Never recorded: stop what carries its tag, if anything does. */
    ssh_agent_state st;
    if (ssh_agent_parse_inspect(&st, r, why) != 0) {
      stop_finish(o, why);
      return;
    }
    if (!st.alive) {
      stop_finish(o, NULL);
      return;
    }
    ssh_agent_instance ai = {.pid = st.pid, .start_time = st.start_time};
    dc_strlcpy(ai.boot_id, st.boot_id, sizeof ai.boot_id);
    o->in_flight = 0;
    stop_send(o, &ai);
    return;
  }
  stop_finish(o, ssh_agent_parse_stop(&res, &pid, r, why) == 0 ? NULL : why);
}

static int sp_stop(provider *base, const store_instance *inst, provider_cb cb, void *payload, char *err) {
  ssh_provider *p = (ssh_provider *)base;
  node *n = node_get(p, inst->node, err);
  if (!n)
    return -1;
  op *o = op_new(p, n, OP_STOP, err);
  if (!o)
    return -1;
  o->inst = *inst;
  o->cb = cb;
  o->payload = payload;
  ssh_agent_instance ai;
  if (parse_handle(inst, &ai)) {
    stop_send(o, &ai);
    return 0;
  }
  char tag[1200];
  tag_of(p, inst, tag, sizeof tag);
  ssh_agent_query q = {.tag = tag, .known = NULL};
  o->kind = OP_STOP_FIND;
  inspect_send(p, n, o, &q, 1);
  return 0;
}

/* ---- inspect, in batches per node ---- */

static void inspect_send(ssh_provider *p, node *n, op *o, const ssh_agent_query *q, size_t nq) {
  char *cmd, err[DC_ERR_MAX];
  if (ssh_agent_inspect_many_command(&cmd, q, nq, err) != 0) {
    fail_later(o, err);
    return;
  }
  run(o, cmd, NULL, 0, deadline(p, n, 5), NULL);
}

static void inspect_answer(ssh_provider *p, const inspect_req *rq, const ssh_agent_state *st, const char *err) {
  if (p->closing)
    return;
  if (err) {
    char why[DC_ERR_MAX];
    dc_fmt(why, sizeof why, "cannot inspect instances on '%s': %s", rq->inst.node, dc_unprefix(err));
    rq->cb(rq->payload, 0, NULL, why);
    return;
  }
  ssh_agent_instance known;
  if (!st->alive || parse_handle(&rq->inst, &known)) {
    rq->cb(rq->payload, st->alive, NULL, NULL);
    return;
  }
  /* The row had no handle: where the instance is, as found by its tag. */
  provider_instance pi;
  memset(&pi, 0, sizeof pi);
  node *n = NULL;
  for (n = p->nodes; n && strcmp(n->dest, rq->inst.node) != 0; n = n->next)
    ;
  dc_strlcpy(pi.host, rq->inst.host[0] ? rq->inst.host : n ? n->addr : "", sizeof pi.host);
  pi.port = rq->inst.port;
  pi.pid = st->pid;
  pi.pid_start = st->start_time;
  dc_fmt(pi.handle, sizeof pi.handle, "%d:%llu:%s", st->pid, (unsigned long long)st->start_time, st->boot_id);
  dc_strlcpy(pi.log_path, rq->inst.log_path, sizeof pi.log_path);
  rq->cb(rq->payload, 1, &pi, NULL);
}

static void inspect_done(op *o, const ssh_result *r, const char *err) {
  ssh_provider *p = o->p;
  char why[DC_ERR_MAX];
  ssh_agent_state *st = calloc(o->nreqs, sizeof *st);
  if (!err && !st) {
    dc_fmt(why, sizeof why, "deploy: out of memory");
    err = why;
  }
  if (!err && ssh_agent_parse_inspect_many(st, o->nreqs, r, why) != 0)
    err = why;
  size_t i = 0;
  for (inspect_req *rq = o->reqs; rq; rq = rq->next, i++)
    inspect_answer(p, rq, err ? NULL : &st[i], err);
  free(st);
  op_free(o);
}

/* Sends one batch of up to INSPECT_BATCH_MAX requests of node n. */
static void batch_send(ssh_provider *p, node *n) {
  char err[DC_ERR_MAX];
  ssh_agent_query q[INSPECT_BATCH_MAX];
  ssh_agent_instance known[INSPECT_BATCH_MAX];
  char tags[INSPECT_BATCH_MAX][64 + 1100];
  op *o = op_new(p, n, OP_INSPECT, err);
  inspect_req *taken = n->batch, *last = NULL;
  size_t nq = 0;
  while (n->batch && nq < INSPECT_BATCH_MAX) {
    last = n->batch;
    n->batch = last->next;
    nq++;
  }
  if (last)
    last->next = NULL;
  if (!n->batch)
    n->batch_tail = NULL;
  size_t i = 0;
  for (inspect_req *rq = taken; rq; rq = rq->next, i++) {
    tag_of(p, &rq->inst, tags[i], sizeof tags[i]);
    q[i].tag = tags[i];
    q[i].known = parse_handle(&rq->inst, &known[i]) ? &known[i] : NULL;
  }
  if (!o) {
    for (inspect_req *rq = taken; rq;) {
      inspect_req *next = rq->next;
      inspect_answer(p, rq, NULL, err);
      free(rq);
      rq = next;
    }
    return;
  }
  o->reqs = taken;
  o->nreqs = nq;
  inspect_send(p, n, o, q, nq);
}

static void on_flush(uv_timer_t *t) {
  ssh_provider *p = t->data;
  for (node *n = p->nodes; n; n = n->next)
    while (n->batch)
      batch_send(p, n);
  /* Failures found before a command ran, reported as ssh reports its own. */
  while (p->late) {
    op *o = p->late;
    p->late = o->lnext;
    if (!p->late)
      p->late_tail = NULL;
    ssh_result r;
    memset(&r, 0, sizeof r);
    r.status = SSH_ESPAWN;
    r.dest = o->n->dest;
    r.exit_status = -1;
    r.out = r.err_text = "";
    on_ssh_done(o, &r, o->late_err);
  }
}

static int sp_inspect(provider *base, const store_instance *inst, provider_inspect_cb cb, void *payload, char *err) {
  ssh_provider *p = (ssh_provider *)base;
  node *n = node_get(p, inst->node, err);
  if (!n)
    return -1;
  inspect_req *rq = calloc(1, sizeof *rq);
  if (!rq) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  rq->inst = *inst;
  rq->cb = cb;
  rq->payload = payload;
  if (n->batch_tail)
    n->batch_tail->next = rq;
  else
    n->batch = rq;
  n->batch_tail = rq;
  /* Whatever else is asked in this loop turn goes in the same command. */
  if (!uv_is_active((uv_handle_t *)&p->flush))
    uv_timer_start(&p->flush, on_flush, 0, 0);
  return 0;
}

/* ---- logs ---- */

static void stream_deliver(provider_stream *s, const char *data, size_t len) {
  if (!s->o->p->closing && len > 0)
    s->cb(s->payload, data, len, 0, NULL);
}

/* Follow: the agent's error, if any, is the first line of the output; it
 * is held until the first line is complete, then passed on if it is not. */
static void on_log_output(void *payload, const char *data, size_t len) {
  op *o = payload;
  provider_stream *s = o->stream;
  if (s->checked) {
    stream_deliver(s, data, len);
    return;
  }
  dc_buf_add(&s->head, data, len);
  if (!s->head.data || !memchr(s->head.data, '\n', s->head.len))
    return;
  if (strncmp(s->head.data, ERROR_PREFIX, sizeof ERROR_PREFIX - 1) == 0)
    return;  /* the exit status 3 reports it */
  s->checked = 1;
  stream_deliver(s, s->head.data, s->head.len);
  dc_buf_free(&s->head);
}

static void logs_done(op *o, const ssh_result *r, const char *err) {
  provider_stream *s = o->stream;
  char why[DC_ERR_MAX], full[DC_ERR_MAX];
  const char *fail = NULL;
  if (err) {
    if (!(s->stopped && r->status == SSH_ECANCELLED))
      fail = err;
  } else if (s->follow && !s->checked && s->head.len > 0 && r->exit_status == 0) {
    /* A log whose last line never ended. */
    stream_deliver(s, s->head.data, s->head.len);
  } else if (r->exit_status == SSH_AGENT_EXIT_ERROR && s->head.len > 0) {
    ssh_result held = *r;
    held.out = s->head.data;
    held.out_len = s->head.len;
    if (ssh_agent_parse_logs(&held, why) != 0)
      fail = why;
  } else if (ssh_agent_parse_logs(r, why) != 0) {
    fail = why;
  } else if (!s->follow) {
    stream_deliver(s, r->out, r->out_len);
  }
  if (fail)
    dc_fmt(full, sizeof full, "deploy: cannot read the log of instance %d of %s on '%s': %s", o->inst.idx,
           o->inst.version, where(&o->inst), dc_unprefix(fail));
  if (!o->p->closing)
    s->cb(s->payload, "", 0, 1, fail ? full : NULL);
  op_free(o);
}

static int sp_logs(provider *base, const store_instance *inst, int lines, int follow, provider_logs_cb cb,
                   void *payload, provider_stream **out, char *err) {
  ssh_provider *p = (ssh_provider *)base;
  if (out)
    *out = NULL;
  if (!inst->log_path[0]) {
    dc_fmt(err, DC_ERR_MAX, "deploy: instance %d of %s on '%s' has no log yet", inst->idx, inst->version,
           where(inst));
    return -1;
  }
  node *n = node_get(p, inst->node, err);
  if (!n)
    return -1;
  char *cmd;
  if (ssh_agent_logs_command(&cmd, inst->log_path, lines > 0 ? lines : 100, follow, err) != 0)
    return -1;
  op *o = op_new(p, n, OP_LOGS, err);
  provider_stream *s = o ? calloc(1, sizeof *s) : NULL;
  if (!s) {
    free(cmd);
    if (o)
      op_free(o);
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  o->inst = *inst;
  o->stream = s;
  s->o = o;
  s->cb = cb;
  s->payload = payload;
  s->follow = follow;
  /* Following has no end of its own: only logs_stop ends it. */
  run(o, cmd, NULL, 0, follow ? 0 : deadline(p, n, 30), follow ? on_log_output : NULL);
  if (follow) {
    /* A follow may last for hours: it does not hold the virtual clock. */
    o->held = 0;
    engine_release(p->e);
  }
  if (out)
    *out = s;
  return 0;
}

static void sp_logs_stop(provider *base, provider_stream *s) {
  (void)base;
  if (!s || s->stopped || !s->o->in_flight)
    return;
  s->stopped = 1;
  ssh_cancel(s->o->ssh);
}

/* ---- preflight ---- */

static void preflight_step(preflight *pf, const char *dest, const char *err) {
  if (err)
    dc_buf_printf(&pf->errors, "%shost '%s' cannot be used: %s", pf->errors.len ? "; " : "", dest, dc_unprefix(err));
  if (--pf->pending > 0)
    return;
  if (!pf->p->closing)
    pf->cb(pf->payload, pf->errors.len ? pf->errors.data : pf->errors.oom ? "deploy: out of memory" : NULL);
  dc_buf_free(&pf->errors);
  free(pf);
}

/* A hello on every node, at once; each refreshes the node's address. */
static int sp_preflight(provider *base, const char *const *nodes, size_t nn, provider_cb cb, void *payload,
                        char *err) {
  ssh_provider *p = (ssh_provider *)base;
  preflight *pf = calloc(1, sizeof *pf);
  if (!pf) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  pf->p = p;
  pf->cb = cb;
  pf->payload = payload;
  pf->pending = 1; /* held until every hello is sent */
  size_t sent = 0;
  for (size_t i = 0; i < nn; i++) {
    char why[DC_ERR_MAX];
    node *n = node_get(p, nodes[i], why);
    pf->pending++;
    if (n && hello_send(p, n, pf, why) == 0) {
      sent++;
      continue;
    }
    preflight_step(pf, nodes[i], why);
  }
  if (sent == 0) {
    /* Nothing went out: no callback may run inside this call. */
    dc_fmt(err, DC_ERR_MAX, "deploy: preflight: %s", pf->errors.len ? pf->errors.data : "no host given");
    dc_buf_free(&pf->errors);
    free(pf);
    return -1;
  }
  preflight_step(pf, NULL, NULL);
  return 0;
}

/* ---- prune: retention on every host ---- */

static void prune_step(prune_all *pa, const char *dest, const char *err) {
  if (err)
    dc_buf_printf(&pa->errors, "%scannot prune logs on '%s': %s", pa->errors.len ? "; " : "", dest, dc_unprefix(err));
  if (--pa->pending > 0)
    return;
  if (!pa->p->closing && pa->cb)
    pa->cb(pa->payload, pa->removed, pa->rotated, pa->freed,
           pa->errors.len ? pa->errors.data : pa->errors.oom ? "deploy: out of memory" : NULL);
  dc_buf_free(&pa->errors);
  free(pa);
}

static void prune_done(op *o, const ssh_result *r, const char *err) {
  char why[DC_ERR_MAX];
  size_t removed = 0, rotated = 0;
  uint64_t freed = 0;
  const char *fail = err;
  if (!fail && ssh_agent_parse_prune(&removed, &rotated, &freed, r, why) != 0)
    fail = why;
  o->pa->removed += removed;
  o->pa->rotated += rotated;
  o->pa->freed += freed;
  prune_step(o->pa, o->n->dest, fail);
}

/* The agent's prune on every node, at once. */
static int sp_prune(provider *base, const char *target, const char *const *nodes, size_t nn, const char *const *drop,
                    size_t ndrop, uint64_t max_bytes, provider_prune_cb cb, void *payload, char *err) {
  ssh_provider *p = (ssh_provider *)base;
  prune_all *pa = calloc(1, sizeof *pa);
  if (!pa) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  pa->p = p;
  pa->cb = cb;
  pa->payload = payload;
  pa->pending = 1; /* held until every command is sent */
  size_t sent = 0;
  for (size_t i = 0; i < nn; i++) {
    char why[DC_ERR_MAX], *cmd = NULL;
    node *n = node_get(p, nodes[i], why);
    op *o = NULL;
    pa->pending++;
    if (n && ssh_agent_prune_command(&cmd, p->log_dir, target, drop, ndrop, max_bytes, why) == 0 &&
        (o = op_new(p, n, OP_PRUNE, why)) != NULL) {
      o->pa = pa;
      run(o, cmd, NULL, 0, deadline(p, n, 30), NULL);
      sent++;
      continue;
    }
    free(cmd);
    prune_step(pa, nodes[i], why);
  }
  if (sent == 0) {
    /* Nothing went out: no callback may run inside this call. */
    dc_fmt(err, DC_ERR_MAX, "deploy: %s", pa->errors.len ? pa->errors.data : "no host given to prune");
    dc_buf_free(&pa->errors);
    free(pa);
    return -1;
  }
  prune_step(pa, NULL, NULL);
  return 0;
}

/* ---- completion of every remote command ---- */

static void on_ssh_done(void *payload, const ssh_result *r, const char *err) {
  op *o = payload;
  o->ssh = NULL;
  o->in_flight = 0;
  if (!o->p->closing && !(o->stream && o->stream->stopped))
    note_host(o->p, o->n, r, err);
  switch (o->kind) {
  case OP_HELLO:
    hello_done(o, r, err);
    op_free(o);
    return;
  case OP_START:
    start_done(o, r, err);
    return;
  case OP_STOP_FIND:
  case OP_STOP:
    stop_done(o, r, err);
    return;
  case OP_INSPECT:
    inspect_done(o, r, err);
    return;
  case OP_LOGS:
    logs_done(o, r, err);
    return;
  case OP_PRUNE:
    prune_done(o, r, err);
    op_free(o);
    return;
  }
}

/* ---- construction ---- */

static void flush_closed(uv_handle_t *h) {
  ssh_provider *p = h->data;
  p->flush_open = 0;
  maybe_destroy(p);
}

/* Instances keep running: they outlive deployctl by design. Commands in
 * flight are cancelled and their callers never hear back (they are going
 * away too); the memory goes once ssh has reported the last of them. */
static void sp_free(provider *base) {
  ssh_provider *p = (ssh_provider *)base;
  if (!p || p->closing)
    return;
  p->closing = 1;
  for (node *n = p->nodes; n; n = n->next) {
    inspect_req *rq = n->batch;
    while (rq) {
      inspect_req *next = rq->next;
      free(rq);
      rq = next;
    }
    n->batch = n->batch_tail = NULL;
    /* Starts waiting for a hello are freed when the hello answers. */
  }
  for (op *o = p->ops.next; o != &p->ops; o = o->next)
    if (o->in_flight)
      ssh_cancel(o->ssh);
  /* Failures not reported yet end their ops now (no one listens: closing
   * keeps every callback of the caller's from running). */
  on_flush(&p->flush);
  uv_close((uv_handle_t *)&p->flush, flush_closed);
}

static int validate(const provider_ssh_opts *o, char *err) {
  if (!o->command || !*o->command) {
    dc_fmt(err, DC_ERR_MAX, "provider.command is empty: give the shell command that starts one instance on a host, e.g. './app --port {port}'");
    return -1;
  }
  if (o->port_min < 1024 || o->port_max > 65535 || o->port_min > o->port_max) {
    dc_fmt(err, DC_ERR_MAX, "provider.ports: '%d-%d' is not a range within 1024-65535: write 'LOW-HIGH', e.g. '20000-20999'",
           o->port_min, o->port_max);
    return -1;
  }
  if (!(o->stop_timeout > 0 && o->stop_timeout <= 86400)) {
    dc_fmt(err, DC_ERR_MAX, "provider.stop_timeout: %g is not between 0 and 86400: give the seconds to wait after SIGTERM before SIGKILL, e.g. 10",
           o->stop_timeout);
    return -1;
  }
  if (!o->tag_prefix || !*o->tag_prefix) {
    dc_fmt(err, DC_ERR_MAX, "provider: tag_prefix is empty: pass the store's location (it tags each instance's environment)");
    return -1;
  }
  if (!o->ssh) {
    dc_fmt(err, DC_ERR_MAX, "provider: the ssh provider needs the target's ssh connections (ssh_ctx_new)");
    return -1;
  }
  for (size_t i = 0; o->env && o->env[i]; i++) {
    if (o->env[i][0] == '=' || !strchr(o->env[i], '=')) {
      dc_fmt(err, DC_ERR_MAX, "provider.env: entry %zu is not NAME=value", i + 1);
      return -1;
    }
  }
  return 0;
}

static char **copy_strv(const char *const *v) {
  size_t n = 0;
  while (v && v[n])
    n++;
  char **c = calloc(n + 1, sizeof *c);
  for (size_t i = 0; c && i < n; i++) {
    c[i] = strdup(v[i]);
    if (!c[i]) {
      free_strv(c);
      return NULL;
    }
  }
  return c;
}

/* A store file's path means something on this machine only. */
static char *make_tag_prefix(const char *store) {
  char host[256] = "localhost";
  dc_buf b = {0};
  if (store[0] == '/') {
    if (gethostname(host, sizeof host - 1) != 0)
      dc_strlcpy(host, "localhost", sizeof host);
    host[sizeof host - 1] = '\0';
    dc_buf_printf(&b, "%s:%s", host, store);
  } else {
    dc_buf_puts(&b, store);
  }
  return dc_buf_take(&b);
}

int provider_ssh_new(provider **out, engine *e, const provider_ssh_opts *o, char *err) {
  *out = NULL;
  if (validate(o, err) != 0)
    return -1;
  ssh_provider *p = calloc(1, sizeof *p);
  if (!p) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory creating the ssh provider");
    return -1;
  }
  p->ops.next = p->ops.prev = &p->ops;
  p->command = strdup(o->command);
  p->log_dir = strdup(o->log_dir && *o->log_dir ? o->log_dir : DEFAULT_LOG_DIR);
  p->workdir = o->workdir && *o->workdir ? strdup(o->workdir) : NULL;
  p->tag_prefix = make_tag_prefix(o->tag_prefix);
  p->env = copy_strv(o->env);
  if (!p->command || !p->log_dir || !p->tag_prefix || !p->env || (o->workdir && *o->workdir && !p->workdir)) {
    destroy(p);
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory creating the ssh provider");
    return -1;
  }
  /* Trailing slashes would double in the log paths. */
  for (size_t n = strlen(p->log_dir); n > 1 && p->log_dir[n - 1] == '/'; n--)
    p->log_dir[n - 1] = '\0';
  p->e = e;
  p->ssh = o->ssh;
  p->port_min = o->port_min;
  p->port_max = o->port_max;
  p->stop_timeout = o->stop_timeout;
  p->connect_timeout = o->connect_timeout > 0 ? o->connect_timeout : DEFAULT_CONNECT_TIMEOUT;
  uv_timer_init(e->loop, &p->flush);
  p->flush.data = p;
  p->flush_open = 1;
  p->base.version = PROVIDER_VERSION;
  p->base.kind = "ssh";
  /* Health checks notice a dead instance too (refused connections); the
   * inspect adds "no use waiting", which can wait a second. */
  p->base.inspect_every = 1.0;
  p->base.start = sp_start;
  p->base.stop = sp_stop;
  p->base.inspect = sp_inspect;
  p->base.logs = sp_logs;
  p->base.logs_stop = sp_logs_stop;
  p->base.preflight = sp_preflight;
  p->base.prune = sp_prune;
  p->base.free = sp_free;
  *out = &p->base;
  return 0;
}
