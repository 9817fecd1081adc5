/* bench/engine_overhead: what the engine itself costs per rollout step.
 *
 * 1,000 canaries (10 steps of 300 s each, default parameters) run on the
 * virtual clock in one process, 100 targets side by side, against
 * in-process instances: one HTTP server on this same loop answers every
 * health check, and the provider "starts" an instance by pointing it at that
 * server. Everything else is the real thing: the SQLite store (WAL,
 * synchronous=FULL), events, the step machines, health checks through
 * libcurl multi, the router interface.
 *
 * Baseline, in the same run: the same number of health-check rounds issued
 * back to back on the bare engine (no store, no strategy), so the ratio says
 * how much the rollout machinery adds around the unavoidable I/O.
 *
 *   build/bench_engine_overhead [canaries] [targets]                          */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"
#include "health.h"
#include "rollout.h"
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

static int p_allocate(provider *p, store *s, store_instance *in, char *err) {
  (void)p; (void)s; (void)err;
  dc_strlcpy(in->host, "127.0.0.1", sizeof in->host);
  in->port = server_port;
  return 0;
}
static int p_start(provider *p, store_instance *in, char *err) {
  (void)p; (void)err;
  in->pid = getpid();
  in->pid_start = dc_proc_start_time(in->pid);
  dc_strlcpy(in->state, "running", sizeof in->state);
  return 0;
}
typedef struct stop_req { provider_cb cb; void *payload; uv_timer_t t; } stop_req;
static void stop_closed(uv_handle_t *h) { free(h->data); }
static void stop_fire(uv_timer_t *t) {
  stop_req *s = t->data;
  s->cb(s->payload, NULL);
  uv_close((uv_handle_t *)&s->t, stop_closed);
}
static uv_loop_t *bench_loop;
static int p_stop(provider *p, const store_instance *in, provider_cb cb, void *payload, char *err) {
  (void)p; (void)in; (void)err;
  stop_req *s = calloc(1, sizeof *s);
  s->cb = cb;
  s->payload = payload;
  uv_timer_init(bench_loop, &s->t);
  s->t.data = s;
  uv_timer_start(&s->t, stop_fire, 0, 0);
  return 0;
}
static int p_alive(provider *p, const store_instance *in) { (void)p; (void)in; return 1; }
static void p_free(provider *p) { free(p); }

static provider *inproc_provider(void) {
  provider *p = calloc(1, sizeof *p);
  p->version = PROVIDER_VERSION;
  p->kind = "inproc";
  p->allocate = p_allocate;
  p->start = p_start;
  p->stop = p_stop;
  p->alive = p_alive;
  p->free = p_free;
  return p;
}

/* ---- driving rollouts ---- */

typedef struct lane {
  engine *e;
  store *s;
  target_config *t;
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
  rollout_opts o = {.version = version, .on_event = on_event, .event_payload = l};
  rollout *r;
  if (rollout_start(&r, l->e, l->s, l->t, l->st, &o, lane_done, l, err) != DC_OK) {
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

int main(int argc, char **argv) {
  int canaries = argc > 1 ? atoi(argv[1]) : 1000;
  int ntargets = argc > 2 ? atoi(argv[2]) : 100;
  if (ntargets > canaries)
    ntargets = canaries;
  char dir[] = "/tmp/deployctl-bench-XXXXXX", path[256], err[DC_ERR_MAX];
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

  store *s;
  if (store_open(&s, path, err) != 0) {
    fprintf(stderr, "%s\n", err);
    return 1;
  }
  canary_params cp;
  canary_params_default(&cp);
  strategy *st;
  strategy_canary_new(&st, &cp, err);

  lane *lanes = calloc((size_t)ntargets, sizeof *lanes);
  int running = 0;
  long steps = 0;
  for (int i = 0; i < ntargets; i++) {
    target_config *t = calloc(1, sizeof *t);
    dc_fmt(t->name, sizeof t->name, "t%d", i);
    t->instances = 1;
    t->provider = inproc_provider();
    router_none_new(&t->router, &e, err);
    target_health_default(&t->health);
    t->health.interval = 300; /* one check per step on the virtual clock */
    t->health.timeout = 2;
    dc_strlcpy(t->tag_prefix, path, sizeof t->tag_prefix);
    store_target_ensure(s, t->name, err);
    lanes[i] = (lane){.e = &e, .s = s, .t = t, .st = st, .running = &running, .steps = &steps};
    /* the first deployment of each target has nothing to canary against */
    lanes[i].remaining = 1 + canaries / ntargets + (i < canaries % ntargets);
  }
  /* warm-up: first deployments, not measured */
  for (int i = 0; i < ntargets; i++) {
    lanes[i].remaining = 1;
    running++;
    lane_next(&lanes[i]);
  }
  while (running > 0)
    engine_run_once(&e);
  steps = 0;
  double vstart = engine_now(&e), t0 = now();
  for (int i = 0; i < ntargets; i++) {
    lanes[i].remaining = canaries / ntargets + (i < canaries % ntargets);
    running++;
    lane_next(&lanes[i]);
  }
  while (running > 0)
    engine_run_once(&e);
  double wall = now() - t0, virt = engine_now(&e) - vstart;
  int failures = 0;
  for (int i = 0; i < ntargets; i++)
    failures += lanes[i].failures;

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

  printf("engine_overhead: %d canaries (10 steps of 300 s), %d targets side by side, virtual clock\n", canaries,
         ntargets);
  printf("rollouts: %.3f s wall for %.0f s of virtual time, %ld steps, %d failed\n", wall, virt, steps, failures);
  printf("per step: %.1f us (store, events, health check, router, step machine)\n", wall / (double)steps * 1e6);
  printf("baseline: %ld bare health checks in %.3f s = %.1f us each\n", rounds, base_wall,
         base_wall / (double)rounds * 1e6);
  printf("ratio rollouts/baseline (per health check issued): %.2fx\n", (wall / (double)rounds) / (base_wall / (double)rounds));
  char cmd[300];
  dc_fmt(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0)
    return 1;
  return failures ? 1 : 0;
}
