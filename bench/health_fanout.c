/* Health check fan-out: 1,000 local endpoints checked all at once through
 * health_check_start, against the same 1,000 checked one after another, both
 * measured in this run. The endpoints are 1,000 listening ports on 127.0.0.1
 * served by a forked child with its own libuv loop, so server work does not
 * share the checking loop.
 *
 *   bench_health_fanout [endpoints] [repeats] [delay_ms]   (1000, 3, 0)
 *
 * On loopback an endpoint answers in microseconds, so both modes are bound
 * by CPU and concurrency has little latency to hide; delay_ms makes every
 * endpoint wait that long before answering, like a real handler or network.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine.h"
#include "health.h"
#include "util.h"

#define URL_MAX 64

/* ---- the endpoints (child process) -------------------------------------- */

typedef struct conn {
  uv_tcp_t tcp;
  uv_timer_t delay;
  uv_write_t write;
  int handles;   /* open uv handles; the last close frees the conn */
  char buf[1024];
  size_t len;
} conn;

static uint64_t delay_ms; /* set in the child before it serves */

static const char RESPONSE[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                               "Connection: close\r\n\r\nok";

static void conn_closed(uv_handle_t *handle) {
  conn *c = handle->data;
  if (--c->handles == 0)
    free(c);
}

static void conn_close(conn *c) {
  uv_close((uv_handle_t *)&c->tcp, conn_closed);
  uv_close((uv_handle_t *)&c->delay, conn_closed);
}

static void conn_alloc(uv_handle_t *handle, size_t hint, uv_buf_t *buf) {
  (void)hint;
  conn *c = handle->data;
  *buf = uv_buf_init(c->buf + c->len, (unsigned)(sizeof c->buf - 1 - c->len));
}

static void conn_written(uv_write_t *req, int status) {
  (void)status;
  conn_close(req->data);
}

static void conn_respond(uv_timer_t *timer) {
  conn *c = timer->data;
  uv_buf_t out = uv_buf_init((char *)RESPONSE, sizeof RESPONSE - 1);
  c->write.data = c;
  uv_write(&c->write, (uv_stream_t *)&c->tcp, &out, 1, conn_written);
}

/* One request per connection: answer once the headers are complete. */
static void conn_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  conn *c = stream->data;
  if (nread < 0 || c->len + (size_t)nread >= sizeof c->buf - 1) {
    conn_close(c);
    return;
  }
  c->len += (size_t)nread;
  c->buf[c->len] = '\0';
  if (!strstr(c->buf, "\r\n\r\n"))
    return;
  uv_read_stop(stream);
  uv_timer_start(&c->delay, conn_respond, delay_ms, 0);
}

static void on_connection(uv_stream_t *server, int status) {
  if (status < 0)
    return;
  conn *c = calloc(1, sizeof *c);
  if (!c)
    return;
  uv_tcp_init(server->loop, &c->tcp);
  uv_timer_init(server->loop, &c->delay);
  c->tcp.data = c;
  c->delay.data = c;
  c->handles = 2;
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
    conn_close(c);
    return;
  }
  uv_read_start((uv_stream_t *)&c->tcp, conn_alloc, conn_read);
}

/* Port 0: the kernel picks free ports, so nothing else on the host clashes. */
static int listen_one(uv_loop_t *loop, uv_tcp_t *tcp, int *port) {
  struct sockaddr_in addr;
  int len = sizeof addr;
  uv_ip4_addr("127.0.0.1", 0, &addr);
  uv_tcp_init(loop, tcp);
  if (uv_tcp_bind(tcp, (const struct sockaddr *)&addr, 0) != 0 ||
      uv_listen((uv_stream_t *)tcp, 128, on_connection) != 0 ||
      uv_tcp_getsockname(tcp, (struct sockaddr *)&addr, &len) != 0)
    return -1;
  *port = ntohs(addr.sin_port);
  return 0;
}

static int write_all(int fd, const void *data, size_t len) {
  const char *p = data;
  while (len > 0) {
    ssize_t w = write(fd, p, len);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0)
      return -1;
    p += w;
    len -= (size_t)w;
  }
  return 0;
}

/* Reports the ports (or a 0 port on failure) on `out`, then serves forever. */
static void serve(int out, int n) {
  prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive the benchmark */
  uv_loop_t loop;
  uv_loop_init(&loop);
  uv_tcp_t *servers = calloc((size_t)n, sizeof *servers);
  int *ports = calloc((size_t)n, sizeof *ports);
  for (int i = 0; servers && ports && i < n; i++) {
    if (listen_one(&loop, &servers[i], &ports[i]) != 0) {
      ports[i] = 0;
      break;
    }
  }
  if (!ports || write_all(out, ports, (size_t)n * sizeof *ports) != 0)
    _exit(1);
  close(out);
  uv_run(&loop, UV_RUN_DEFAULT);
  _exit(0);
}

static int read_all(int fd, void *data, size_t len) {
  char *p = data;
  while (len > 0) {
    ssize_t r = read(fd, p, len);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return -1;
    p += r;
    len -= (size_t)r;
  }
  return 0;
}

/* Forks before the parent creates any loop or curl state. */
static pid_t spawn_endpoints(int n, int *ports) {
  int fds[2];
  if (pipe(fds) != 0)
    return -1;
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    serve(fds[1], n);
  }
  close(fds[1]);
  int rc = pid > 0 ? read_all(fds[0], ports, (size_t)n * sizeof *ports) : -1;
  close(fds[0]);
  for (int i = 0; rc == 0 && i < n; i++)
    rc = ports[i] > 0 ? 0 : -1;
  if (rc != 0 && pid > 0) {
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
  }
  return rc == 0 ? pid : -1;
}

/* Each endpoint holds a listening socket and a connection in the child, and
 * a client socket here: ask for the hard limit rather than the usual 1024. */
static void raise_nofile(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

static int fit_to_nofile(int n) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
    return n;
  int room = rl.rlim_cur > 64 ? (int)((rl.rlim_cur - 64) / 2) : 0;
  if (room >= n)
    return n;
  fprintf(stderr, "health_fanout: RLIMIT_NOFILE %llu allows %d endpoints, "
          "not %d\n", (unsigned long long)rl.rlim_cur, room, n);
  return room;
}

/* ---- the checks (parent process) ---------------------------------------- */

typedef struct run {
  engine *e;
  const char *const *urls;
  size_t n;
  size_t next;      /* sequential: index of the next URL to check */
  size_t ok;
  int done;
  char first_error[512];
} run;

static void note_results(run *r, const health_result *res, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (res[i].ok)
      r->ok++;
    else if (!r->first_error[0])
      dc_fmt(r->first_error, sizeof r->first_error, "%s: %s", res[i].url,
             res[i].error);
  }
}

static void on_all(void *payload, const health_result *res, size_t n) {
  run *r = payload;
  note_results(r, res, n);
  r->done = 1;
}

static void on_one(void *payload, const health_result *res, size_t n) {
  run *r = payload;
  char err[DC_ERR_MAX];
  note_results(r, res, n);
  if (r->next == r->n) {
    r->done = 1;
    return;
  }
  const char *const *url = &r->urls[r->next++];
  if (health_check_start(r->e, url, 1, NULL, on_one, r, err) != 0) {
    dc_strlcpy(r->first_error, err, sizeof r->first_error);
    r->done = 1;
  }
}

/* Seconds for one pass, or -1 when a check could not start or failed. */
static double time_pass(run *r, int sequential) {
  char err[DC_ERR_MAX];
  r->next = sequential ? 1 : r->n;
  r->ok = 0;
  r->done = 0;
  r->first_error[0] = '\0';
  uint64_t t0 = uv_hrtime();
  size_t count = sequential ? 1 : r->n;
  if (health_check_start(r->e, r->urls, count, NULL,
                         sequential ? on_one : on_all, r, err) != 0) {
    fprintf(stderr, "health_fanout: %s\n", err);
    return -1;
  }
  while (!r->done)
    uv_run(r->e->loop, UV_RUN_ONCE);
  double secs = (double)(uv_hrtime() - t0) / 1e9;
  if (r->ok != r->n) {
    fprintf(stderr, "health_fanout: %zu of %zu checks failed, first: %s\n",
            r->n - r->ok, r->n, r->first_error);
    return -1;
  }
  return secs;
}

static double best_of(run *r, int sequential, int repeats) {
  double best = -1;
  for (int i = 0; i < repeats; i++) {
    double secs = time_pass(r, sequential);
    if (secs < 0)
      return -1;
    if (best < 0 || secs < best)
      best = secs;
  }
  return best;
}

static int measure(engine *e, const char *const *urls, size_t n, int repeats) {
  run r = {.e = e, .urls = urls, .n = n};
  double conc = best_of(&r, 0, repeats);
  double seq = conc < 0 ? -1 : best_of(&r, 1, repeats);
  if (conc <= 0 || seq <= 0)
    return -1;
  printf("health_fanout: %zu endpoints answering after %llu ms (best of %d)\n",
         n, (unsigned long long)delay_ms, repeats);
  printf("concurrent: %zu checks in %.3f s = %.0f checks/s\n", n, conc,
         (double)n / conc);
  printf("sequential: %zu checks in %.3f s = %.0f checks/s\n", n, seq,
         (double)n / seq);
  printf("ratio concurrent/sequential: %.1fx\n", seq / conc);
  return 0;
}

static int check_endpoints(const int *ports, int n, int repeats) {
  char(*buf)[URL_MAX] = calloc((size_t)n, sizeof *buf);
  const char **urls = calloc((size_t)n, sizeof *urls);
  engine e = {0};
  int rc = -1;
  if (buf && urls && engine_init(&e, 0) == 0) {
    for (int i = 0; i < n; i++) {
      dc_fmt(buf[i], URL_MAX, "http://127.0.0.1:%d/healthz", ports[i]);
      urls[i] = buf[i];
    }
    rc = measure(&e, urls, (size_t)n, repeats);
    engine_close(&e);
  }
  free(urls);
  free(buf);
  return rc;
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 1000;
  int repeats = argc > 2 ? atoi(argv[2]) : 3;
  int delay = argc > 3 ? atoi(argv[3]) : 0;
  if (n <= 0 || repeats <= 0 || delay < 0) {
    fprintf(stderr, "usage: %s [endpoints > 0] [repeats > 0] [delay_ms >= 0]\n",
            argv[0]);
    return 2;
  }
  delay_ms = (uint64_t)delay;
  raise_nofile();
  n = fit_to_nofile(n);
  int *ports = calloc((size_t)n, sizeof *ports);
  pid_t child = ports ? spawn_endpoints(n, ports) : -1;
  if (child < 0) {
    fprintf(stderr, "health_fanout: could not start %d endpoints on "
            "127.0.0.1\n", n);
    free(ports);
    return 1;
  }
  int rc = check_endpoints(ports, n, repeats);
  kill(child, SIGTERM);
  waitpid(child, NULL, 0);
  free(ports);
  return rc == 0 ? 0 : 1;
}
