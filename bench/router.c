/* bench/router: what one traffic step costs through each router, from
 * "apply" to "applied", measured in the same run: HAProxy's runtime API
 * (runtime/haproxy.c: show servers state, then a few set weight commands)
 * against nginx's reload (runtime/nginx.c: the include written and synced,
 * nginx -T, SIGHUP, then the new generation confirmed and the old workers
 * no longer accepting).
 *
 *   build/bench_router [steps=20]
 *
 * The bench starts both proxies itself (haproxy and nginx from the PATH or
 * $HAPROXY / $NGINX, as root for nginx), with everything in a temp dir and
 * their frontends on unix sockets, so it needs no port. The servers behind
 * them never have to exist: a weight change does not connect to them.
 * Each step is one canary step of 2 old and 2 new servers (10 % to 90 %
 * and back, router_split_weights' integers), alternating HAProxy and nginx
 * so that both see the same noise of this shared machine.
 *
 * Last, two checks the specs cannot make from Lua: three applies queued at
 * once on one nginx router must end in order, each once, the last one's
 * weights in the include; and free() is called at every moment of an nginx
 * apply (0 to 200 ms after it starts): the callback must run exactly once,
 * and the include must end up as the old or the new file, never torn or
 * untested. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine.h"
#include "router.h"
#include "util.h"

#define NSERVERS 4

static char dir[] = "/tmp/deployctl-bench-router-XXXXXX";
static pid_t children[2];

static const char *bin(const char *env, const char *dflt) {
  const char *v = getenv(env);
  return v && *v ? v : dflt;
}

static void write_text(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
    fprintf(stderr, "bench_router: cannot write %s: %s\n", path, strerror(errno));
    exit(1);
  }
}

/* Runs argv in the foreground of its own, output to log; dies with us. */
static pid_t start(char *const argv[], const char *log) {
  pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (!freopen(log, "a", stdout) || !freopen(log, "a", stderr))
      _exit(127);
    execvp(argv[0], argv);
    _exit(127);
  }
  return pid;
}

static int exists(const char *path) {
  struct stat st;
  return stat(path, &st) == 0;
}

static void wait_for(const char *path, pid_t pid, const char *what) {
  for (int i = 0; i < 500 && !exists(path); i++) {
    if (waitpid(pid, NULL, WNOHANG) == pid) {
      fprintf(stderr, "bench_router: %s exited at start-up (see %s)\n", what, dir);
      exit(1);
    }
    usleep(10000);
  }
  if (!exists(path)) {
    fprintf(stderr, "bench_router: %s did not create %s\n", what, path);
    exit(1);
  }
}

static void start_proxies(char *include, char *conf, char *pidfile, char *socket) {
  char path[300], text[2048], log[300];
  dc_fmt(socket, 300, "%s/admin.sock", dir);
  dc_fmt(path, sizeof path, "%s/haproxy.cfg", dir);
  dc_fmt(text, sizeof text,
         "global\n  stats socket %s level admin\n\ndefaults\n  mode http\n"
         "  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\n"
         "frontend fe\n  bind unix@%s/haproxy-fe.sock\n  default_backend app\n\n"
         "backend app\n  balance roundrobin\n",
         socket, dir);
  write_text(path, text);
  dc_fmt(log, sizeof log, "%s/haproxy.log", dir);
  char *hap[] = {(char *)bin("HAPROXY", "haproxy"), "-db", "-f", path, NULL};
  children[0] = start(hap, log);

  /* The include in the router's empty form (README, "nginx"). */
  dc_fmt(include, 300, "%s/app.conf", dir);
  dc_fmt(text, sizeof text,
         "# deployctl nginx router: upstream app, generation 0.\n"
         "# Every apply rewrites this file: do not edit it.\n"
         "upstream app {\n    server 127.0.0.1:1 down;  # (none)\n}\n"
         "server {\n    listen unix:%s/app.gen.sock;\n    access_log off;\n"
         "    location / { return 200 \"0\"; }\n}\n",
         dir);
  write_text(include, text);
  dc_fmt(conf, 300, "%s/nginx.conf", dir);
  dc_fmt(pidfile, 300, "%s/nginx.pid", dir);
  dc_fmt(text, sizeof text,
         "worker_processes 2;\npid %s;\nerror_log %s/error.log;\n"
         "events { worker_connections 1024; }\n"
         "http {\n  access_log off;\n  client_body_temp_path %s/tmp;\n"
         "  proxy_temp_path %s/tmp;\n  include %s;\n"
         "  server { listen unix:%s/nginx-fe.sock; location / { proxy_pass http://app; } }\n}\n",
         pidfile, dir, dir, dir, include, dir);
  write_text(conf, text);
  dc_fmt(log, sizeof log, "%s/nginx.log", dir);
  char *ngx[] = {(char *)bin("NGINX", "/usr/sbin/nginx"), "-c", conf, "-g", "daemon off;", NULL};
  children[1] = start(ngx, log);
  wait_for(socket, children[0], "haproxy");
  dc_fmt(path, sizeof path, "%s/app.gen.sock", dir);
  wait_for(path, children[1], "nginx");
  wait_for(pidfile, children[1], "nginx");
}

/* ---- one apply, waited for on the loop ----------------------------------- */

typedef struct call {
  int calls;
  char err[DC_ERR_MAX];
} call;

static void on_applied(void *payload, const char *err) {
  call *c = payload;
  c->calls++;
  if (err)
    dc_strlcpy(c->err, err, sizeof c->err);
}

static void servers_at(router_server *s, double pct) {
  int w_old, w_new;
  router_split_weights(pct, 2, 2, &w_old, &w_new);
  for (int i = 0; i < NSERVERS; i++) {
    memset(&s[i], 0, sizeof s[i]);
    dc_fmt(s[i].name, sizeof s[i].name, "dc_%d", i + 1);
    dc_strlcpy(s[i].host, "127.0.0.1", sizeof s[i].host);
    s[i].port = 20001 + i;
    s[i].weight = i < 2 ? w_old : w_new;
  }
}

/* A plan of weights alone. */
static int apply_plain(router *r, const router_server *s, size_t n, router_cb cb, void *payload, char *err) {
  router_plan plan = {.servers = s, .n = n};
  return r->apply(r, &plan, cb, payload, err);
}

/* Milliseconds from apply to its callback. */
static double apply_ms(engine *e, router *r, double pct) {
  router_server s[NSERVERS];
  call c = {0};
  char err[DC_ERR_MAX];
  servers_at(s, pct);
  uint64_t t0 = uv_hrtime();
  if (apply_plain(r, s, NSERVERS, on_applied, &c, err) != 0) {
    fprintf(stderr, "bench_router: %s\n", err);
    exit(1);
  }
  while (c.calls == 0)
    engine_run_once(e);
  double ms = (double)(uv_hrtime() - t0) / 1e6;
  if (c.err[0]) {
    fprintf(stderr, "bench_router: %s apply failed: %s\n", r->kind, c.err);
    exit(1);
  }
  return ms;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double pctile(double *v, int n, double p) {
  qsort(v, (size_t)n, sizeof *v, cmp_double);
  return v[(int)(p * (n - 1) + 0.5)];
}

/* ---- free during an apply ------------------------------------------------ */

static void on_tick(uv_timer_t *t) { (void)t; }

/* Runs the loop for ms, so work a free left behind can finish. */
static void run_for(engine *e, uint64_t ms) {
  uv_timer_t t;
  uv_timer_init(e->loop, &t);
  uv_timer_start(&t, on_tick, 5, 5);
  uint64_t end = uv_now(e->loop) + ms;
  while (uv_now(e->loop) < end)
    engine_run_once(e);
  uv_close((uv_handle_t *)&t, NULL);
  engine_run_once(e);
}

static void on_read(void *payload, const char *err) { on_applied(payload, err); }

/* The servers of the include, through a fresh router's read. */
static int read_weights(engine *e, const router_nginx_opts *o, int *w) {
  router *r;
  router_server s[NSERVERS + 1];
  size_t n = 0;
  call c = {0};
  char err[DC_ERR_MAX];
  if (router_nginx_new(&r, e, o, err) != 0 ||
      r->read(r, s, NSERVERS + 1, &n, on_read, &c, err) != 0)
    return -1;
  while (c.calls == 0)
    engine_run_once(e);
  r->free(r);
  run_for(e, 1);
  if (c.err[0] || n != NSERVERS) {
    fprintf(stderr, "bench_router: include unreadable after free: %s\n", c.err);
    return -1;
  }
  for (int i = 0; i < NSERVERS; i++)
    w[i] = s[i].weight;
  return 0;
}

static int free_during_apply(engine *e, const router_nginx_opts *o) {
  static const int delays[] = {0, 1, 2, 5, 10, 20, 40, 80, 120, 200};
  int bad = 0;
  for (size_t i = 0; i < sizeof delays / sizeof *delays; i++) {
    router *r;
    router_server s[NSERVERS];
    call c = {0};
    char err[DC_ERR_MAX];
    int before[NSERVERS], after[NSERVERS], w_old, w_new;
    double pct = (i % 2) ? 30 : 70;
    if (read_weights(e, o, before) != 0 || router_nginx_new(&r, e, o, err) != 0)
      return -1;
    servers_at(s, pct);
    router_split_weights(pct, 2, 2, &w_old, &w_new);
    apply_plain(r, s, NSERVERS, on_applied, &c, err);
    run_for(e, (uint64_t)delays[i]);
    r->free(r);
    run_for(e, 300);
    if (read_weights(e, o, after) != 0)
      return -1;
    int same = memcmp(before, after, sizeof before) == 0;
    int now_new = after[0] == w_old && after[2] == w_new;
    if (c.calls != 1 || !(same || now_new)) {
      fprintf(stderr, "bench_router: free after %d ms: %d callbacks, include %s\n", delays[i], c.calls,
              same || now_new ? "ok" : "neither old nor new");
      bad++;
    }
  }
  return bad;
}

typedef struct fifo {
  int order[3], n;
  char err[DC_ERR_MAX];
} fifo;

typedef struct fifo_call {
  fifo *f;
  int i;
} fifo_call;

static void on_fifo(void *payload, const char *err) {
  fifo_call *c = payload;
  c->f->order[c->f->n++] = c->i;
  if (err)
    dc_strlcpy(c->f->err, err, sizeof c->f->err);
}

static int queued_in_order(engine *e, const router_nginx_opts *o) {
  static const double pcts[3] = {20, 60, 90};
  router *r;
  router_server s[NSERVERS];
  fifo f = {{0}, 0, ""};
  fifo_call calls[3];
  char err[DC_ERR_MAX];
  int w[NSERVERS], w_old, w_new;
  if (router_nginx_new(&r, e, o, err) != 0)
    return -1;
  for (int i = 0; i < 3; i++) {
    calls[i] = (fifo_call){&f, i};
    servers_at(s, pcts[i]);
    if (apply_plain(r, s, NSERVERS, on_fifo, &calls[i], err) != 0)
      return -1;
  }
  while (f.n < 3)
    engine_run_once(e);
  r->free(r);
  run_for(e, 1);
  router_split_weights(pcts[2], 2, 2, &w_old, &w_new);
  if (f.err[0] || f.order[0] != 0 || f.order[1] != 1 || f.order[2] != 2 ||
      read_weights(e, o, w) != 0 || w[0] != w_old || w[2] != w_new) {
    fprintf(stderr, "bench_router: queued applies: order %d %d %d, %s\n", f.order[0], f.order[1], f.order[2],
            f.err[0] ? f.err : "the include does not hold the last one");
    return -1;
  }
  return 0;
}

int main(int argc, char **argv) {
  int steps = argc > 1 ? atoi(argv[1]) : 20;
  char include[300], conf[300], pidfile[300], socket[300], err[DC_ERR_MAX];
  if (steps < 2 || !mkdtemp(dir))
    return 1;
  chmod(dir, 0755);  /* nginx's workers (nobody) reach its temp path */
  start_proxies(include, conf, pidfile, socket);

  engine e;
  engine_init(&e, 0);
  router *hap, *ngx;
  router_haproxy_opts ho = {.socket = socket, .backend = "app"};
  router_nginx_opts no = {.include = include, .upstream = "app", .conf = conf, .pid = pidfile,
                          .nginx = bin("NGINX", "/usr/sbin/nginx")};
  if (router_haproxy_new(&hap, &e, &ho, err) != 0 || router_nginx_new(&ngx, &e, &no, err) != 0) {
    fprintf(stderr, "bench_router: %s\n", err);
    return 1;
  }
  /* warm-up, not measured: the servers are added */
  apply_ms(&e, hap, 50);
  apply_ms(&e, ngx, 50);
  double *th = calloc((size_t)steps, sizeof *th), *tn = calloc((size_t)steps, sizeof *tn);
  for (int i = 0; i < steps; i++) {
    double pct = 10 + 10 * (i % 9);  /* 10 .. 90 %, every step a change */
    th[i] = apply_ms(&e, hap, pct);
    tn[i] = apply_ms(&e, ngx, pct);
  }
  double hm = pctile(th, steps, 0.5), h9 = pctile(th, steps, 0.9);
  double nm = pctile(tn, steps, 0.5), n9 = pctile(tn, steps, 0.9);
  printf("router: one canary step (2 old + 2 new servers), apply to applied, %d steps each\n", steps);
  printf("haproxy runtime API: median %.2f ms, p90 %.2f ms\n", hm, h9);
  printf("nginx reload:        median %.2f ms, p90 %.2f ms\n", nm, n9);
  printf("ratio nginx/haproxy (median): %.1fx\n", nm / hm);
  hap->free(hap);
  ngx->free(ngx);
  run_for(&e, 1);

  int fifo_bad = queued_in_order(&e, &no) != 0;
  printf("three applies queued at once on one nginx router: %s\n",
         fifo_bad ? "FAILED" : "ended in order, once each, the last one applied");
  int bad = free_during_apply(&e, &no);
  printf("free during an nginx apply at 10 moments (0-200 ms): %s\n",
         bad == 0 ? "callback once, include old or new every time" : "FAILED");
  engine_close(&e);
  free(th);
  free(tn);
  for (int i = 0; i < 2; i++) {
    kill(children[i], SIGTERM);
    waitpid(children[i], NULL, 0);
  }
  char cmd[300];
  dc_fmt(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0)
    return 1;
  return bad == 0 && !fifo_bad ? 0 : 1;
}
