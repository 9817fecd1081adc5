/* bench/engine_overhead: what the engine itself costs per rollout step.
 *
 * 1,000 canaries (10 steps of 300 s each, default parameters) run on the
 * virtual clock in one process, 100 targets side by side, against
 * in-process instances: one HTTP server on this same loop answers every
 * health check, and the provider "starts" an instance by pointing it at that
 * server. Everything else is the real thing: the deployment service, the
 * store (SQLite, WAL, synchronous=FULL, group commit), events, the step
 * machines, health checks through libcurl multi, the router interface.
 *
 * Baseline, in the same run: the same number of health-check rounds issued
 * back to back on the bare engine (no store, no strategy), so the ratio says
 * how much the rollout machinery adds around the unavoidable I/O. It also
 * prints how many store transactions (each one fsync) a step costs.
 *
 *   build/bench_engine_overhead [canaries] [targets] [state]
 * state: a file path (default: a temporary SQLite file) or postgresql://... */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"
#include "health.h"
#include "service.h"
#include "store.h"
#include "strategy.h"
#include "target.h"
#include "util.h"

static int server_port;

/* ---- the in-process HTTP server ---- */

typedef struct conn {
  uv_tcp_t tcp;
  uv_write_t w;
  char buf[512];
} conn;

static const char answer[] = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";

static void conn_closed(uv_handle_t *h) { free(h->data); }
static void written(uv_write_t *w, int status) {
  (void)status;
  conn *c = w->data;
  uv_close((uv_handle_t *)&c->tcp, conn_closed);
}
static void alloc_cb(uv_handle_t *h, size_t s, uv_buf_t *b) {
  (void)s;
  conn *c = h->data;
  *b = uv_buf_init(c->buf, sizeof c->buf);
}
static void read_cb(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  (void)b;
  conn *c = s->data;
  if (n < 0) {
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
    return;
  }
  if (n == 0)
    return;
  uv_read_stop(s);
  uv_buf_t out = uv_buf_init((char *)answer, sizeof answer - 1);
  c->w.data = c;
  uv_write(&c->w, s, &out, 1, written);
}
static void on_conn(uv_stream_t *server, int status) {
  if (status < 0)
    return;
  conn *c = calloc(1, sizeof *c);
  uv_tcp_init(server->loop, &c->tcp);
  c->tcp.data = c;
  if (uv_accept(server, (uv_stream_t *)&c->tcp) == 0)
    uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb);
  else
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
}

/* ---- an in-process provider ---- */

static uv_loop_t *bench_loop;

/* Every answer comes from the loop, as the interface requires. */
typedef struct later {
  uv_timer_t t;
  int kind; /* 0 start, 1 stop, 2 inspect, 3 logs */
  void *cb;
  void *payload;
  provider_instance pi;
} later;

static void later_closed(uv_handle_t *h) { free(h->data); }

static void later_fire(uv_timer_t *t) {
  later *l = t->data;
  switch (l->kind) {
  case 0:
    ((provider_start_cb)l->cb)(l->payload, &l->pi, NULL);
    break;
  case 1:
    ((provider_cb)l->cb)(l->payload, NULL);
    break;
  case 2:
    ((provider_inspect_cb)l->cb)(l->payload, 1, NULL, NULL);
    break;
  default:
    ((provider_logs_cb)l->cb)(l->payload, "", 0, 1, NULL);
  }
  uv_close((uv_handle_t *)&l->t, later_closed);
}

static int answer_later(int kind, void *cb, void *payload, const provider_instance *pi) {
  later *l = calloc(1, sizeof *l);
  if (!l)
    return -1;
  l->kind = kind;
  l->cb = cb;
  l->payload = payload;
  if (pi)
    l->pi = *pi;
  uv_timer_init(bench_loop, &l->t);
  l->t.data = l;
  uv_timer_start(&l->t, later_fire, 0, 0);
  return 0;
}

static int p_start(provider *p, const provider_start_req *req, provider_start_cb cb, void *payload, char *err) {
  (void)p;
  (void)req;
  (void)err;
  provider_instance pi;
  memset(&pi, 0, sizeof pi);
  dc_strlcpy(pi.host, "127.0.0.1", sizeof pi.host);
  pi.port = server_port;
  pi.pid = getpid();
  dc_fmt(pi.handle, sizeof pi.handle, "%d:0", pi.pid);
  return answer_later(0, (void *)cb, payload, &pi);
}
static int p_stop(provider *p, const store_instance *in, provider_cb cb, void *payload, char *err) {
  (void)p;
  (void)in;
  (void)err;
  return answer_later(1, (void *)cb, payload, NULL);
}
static int p_inspect(provider *p, const store_instance *in, provider_inspect_cb cb, void *payload, char *err) {
  (void)p;
  (void)in;
  (void)err;
  return answer_later(2, (void *)cb, payload, NULL);
}
static int p_logs(provider *p, const store_instance *in, int lines, int follow, provider_logs_cb cb, void *payload,
                  provider_stream **out, char *err) {
  (void)p;
  (void)in;
  (void)lines;
  (void)follow;
  (void)err;
  if (out)
    *out = NULL;
  return answer_later(3, (void *)cb, payload, NULL);
}
static void p_logs_stop(provider *p, provider_stream *s) {
  (void)p;
  (void)s;
}
static void p_free(provider *p) { free(p); }

static provider *inproc_provider(void) {
  provider *p = calloc(1, sizeof *p);
  p->version = PROVIDER_VERSION;
  p->kind = "inproc";
  p->on_engine_clock = 1; /* in-process: up at once, nothing real to wait for */
  p->start = p_start;
  p->stop = p_stop;
  p->inspect = p_inspect;
  p->logs = p_logs;
  p->logs_stop = p_logs_stop;
  p->free = p_free;
  return p;
}

/* ---- driving rollouts ---- */

typedef struct lane {
  service *svc;
  const char *target;
  strategy *st;
  int remaining;
  int version;
  int *running;
  long *steps;
  int failures;
} lane;

static void lane_next(lane *l);

static void on_event(void *payload, const store_event *ev) {
  lane *l = payload;
  if (strcmp(ev->kind, "traffic") == 0 || strcmp(ev->kind, "healthy") == 0 || strcmp(ev->kind, "verified") == 0 ||
      strcmp(ev->kind, "promoted") == 0 || strcmp(ev->kind, "instance_started") == 0 ||
      strcmp(ev->kind, "instance_stopped") == 0)
    (*l->steps)++;
}

static void lane_done(void *payload, const rollout_result *res) {
  lane *l = payload;
  if (!res->success) {
    l->failures++;
    fprintf(stderr, "rollout failed: %s\n", res->nerrors ? res->errors[0] : "?");
  }
  lane_next(l);
}

static void lane_next(lane *l) {
  char err[DC_ERR_MAX], version[32];
  if (l->remaining == 0) {
    (*l->running)--;
    return;
  }
  l->remaining--;
  dc_fmt(version, sizeof version, "v%d", ++l->version);
  rollout_opts o = {.version = version, .sink = {on_event, l}};
  if (service_deploy(l->svc, l->target, l->st, &o, lane_done, l, NULL, err) != DC_OK) {
    fprintf(stderr, "%s\n", err);
    exit(1);
  }
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- the baseline: health rounds back to back ---- */

typedef struct base { engine *e; long left; const char *url; } base;
static void base_next(base *b);
static void base_done(void *payload, const health_result *r, size_t n) {
  (void)r; (void)n;
  base_next(payload);
}
static void base_next(base *b) {
  char err[DC_ERR_MAX];
  if (b->left-- <= 0)
    return;
  health_opts o = {.timeout = 2, .expect_status = 200};
  health_check_start(b->e, &b->url, 1, &o, base_done, b, err);
}

/* One pass of `canaries` canaries over `ntargets` targets against the store
 * at `state`; prints its figures and returns the engine's cost per step in
 * microseconds (negative when the store could not be opened). */
static double run_store(engine *e, const char *state, int canaries, int ntargets, int *failed, double *wall_out,
                        const char **kind) {
  char err[DC_ERR_MAX];
  store *s;
  if (store_open(&s, e, state, err) != 0) {
    fprintf(stderr, "%s\n", err);
    return -1;
  }
  canary_params cp;
  canary_params_default(&cp);
  strategy *st;
  strategy_canary_new(&st, &cp, err);

  target_config **targets = calloc((size_t)ntargets, sizeof *targets);
  for (int i = 0; i < ntargets; i++) {
    char name[32];
    dc_fmt(name, sizeof name, "t%d", i);
    target_config *t = target_config_new(name);
    t->instances = 1;
    t->provider = inproc_provider();
    router_none_new(&t->router, e, err);
    t->health.interval = 300; /* one check per step on the virtual clock */
    t->health.timeout = 2;
    store_target_ensure(s, t->name, NULL, NULL, err);
    targets[i] = t;
  }
  service *svc;
  if (service_new(&svc, e, s, targets, (size_t)ntargets, err) != DC_OK) {
    fprintf(stderr, "%s\n", err);
    return -1;
  }
  lane *lanes = calloc((size_t)ntargets, sizeof *lanes);
  int running = 0;
  long steps = 0;
  for (int i = 0; i < ntargets; i++)
    lanes[i] = (lane){.svc = svc, .target = service_target_at(svc, (size_t)i)->name, .st = st, .running = &running,
                      .steps = &steps};
  /* warm-up: first deployments (nothing to canary against), not measured */
  for (int i = 0; i < ntargets; i++) {
    lanes[i].remaining = 1;
    running++;
    lane_next(&lanes[i]);
  }
  while (running > 0)
    engine_run_once(e);
  steps = 0;
  uint64_t commits0, writes0, commits1, writes1;
  store_stats(s, &commits0, &writes0);
  double vstart = engine_now(e), t0 = now();
  for (int i = 0; i < ntargets; i++) {
    lanes[i].remaining = canaries / ntargets + (i < canaries % ntargets);
    running++;
    lane_next(&lanes[i]);
  }
  while (running > 0)
    engine_run_once(e);
  double wall = now() - t0, virt = engine_now(e) - vstart;
  store_stats(s, &commits1, &writes1);
  for (int i = 0; i < ntargets; i++)
    *failed += lanes[i].failures;

  double per_step = wall / (double)steps * 1e6;
  *wall_out = wall;
  *kind = store_kind(s);
  printf("%s store: %.3f s wall for %.0f s of virtual time, %ld steps\n", store_kind(s), wall, virt, steps);
  printf("  per step: %.1f us (store, events, health check, router, step machine)\n", per_step);
  printf("  store: %llu transactions for %llu writes = %.3f transactions per step, %.1f writes per transaction\n",
         (unsigned long long)(commits1 - commits0), (unsigned long long)(writes1 - writes0),
         (double)(commits1 - commits0) / (double)steps,
         (double)(writes1 - writes0) / (double)(commits1 - commits0 ? commits1 - commits0 : 1));
  service_unref(svc);
  store_unref(s);
  strategy_free(st);
  free(lanes);
  /* the store's last commits and closes finish on the loop */
  for (int i = 0; i < 100; i++)
    uv_run(e->loop, UV_RUN_NOWAIT);
  return per_step;
}

int main(int argc, char **argv) {
  int canaries = argc > 1 ? atoi(argv[1]) : 1000;
  int ntargets = argc > 2 ? atoi(argv[2]) : 100;
  if (canaries <= 0 || ntargets <= 0) {
    fprintf(stderr, "usage: bench_engine_overhead [canaries] [targets] [state ...]\n");
    return 2;
  }
  if (ntargets > canaries)
    ntargets = canaries;
  char dir[] = "/tmp/deployctl-bench-XXXXXX", path[256];
  if (!mkdtemp(dir))
    return 1;
  dc_fmt(path, sizeof path, "%s/state.db", dir);

  engine e;
  engine_init(&e, 1);
  bench_loop = e.loop;
  uv_tcp_t server;
  struct sockaddr_in addr;
  uv_tcp_init(e.loop, &server);
  uv_ip4_addr("127.0.0.1", 0, &addr);
  uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0);
  uv_listen((uv_stream_t *)&server, 512, on_conn);
  struct sockaddr_storage bound;
  int len = sizeof bound;
  uv_tcp_getsockname(&server, (struct sockaddr *)&bound, &len);
  server_port = ntohs(((struct sockaddr_in *)&bound)->sin_port);

  printf("engine_overhead: %d canaries (10 steps of 300 s), %d targets side by side, virtual clock\n", canaries,
         ntargets);
  /* every state named runs in turn on the same engine; the first is the
   * reference the others are compared with */
  int nstates = argc > 3 ? argc - 3 : 1, failures = 0;
  double first = 0, walls[64];
  const char *kinds[64];
  if (nstates > 64)
    nstates = 64;
  for (int i = 0; i < nstates; i++) {
    const char *state = argc > 3 && strcmp(argv[3 + i], "sqlite") != 0 ? argv[3 + i] : path;
    if (i > 0 && state == path) {
      fprintf(stderr, "'sqlite' (a temporary SQLite file) may be named once\n");
      return 2;
    }
    double per_step = run_store(&e, state, canaries, ntargets, &failures, &walls[i], &kinds[i]);
    if (per_step < 0)
      return 1;
    if (i == 0)
      first = per_step;
    else
      printf("  ratio to the first store (per step): %.2fx\n", per_step / first);
  }

  /* baseline: as many health rounds as the canaries made, back to back */
  char url[64];
  dc_fmt(url, sizeof url, "http://127.0.0.1:%d/healthz", server_port);
  long rounds = (long)canaries * 12; /* healthy + 9 gated waits + verify + slack */
  base b = {.e = &e, .left = rounds, .url = url};
  double b0 = now();
  base_next(&b);
  while (b.left >= 0 && engine_run_once(&e))
    ;
  double base_wall = now() - b0;
  printf("baseline: %ld bare health checks in %.3f s = %.1f us each\n", rounds, base_wall,
         base_wall / (double)rounds * 1e6);
  for (int i = 0; i < nstates; i++)
    printf("ratio rollouts/baseline (per health check issued), %s store: %.2fx\n", kinds[i], walls[i] / base_wall);
  if (failures)
    printf("%d rollouts failed\n", failures);
  char cmd[300];
  dc_fmt(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0)
    return 1;
  return failures ? 1 : 0;
}
