/* demo-app: the application the specs deploy. A small HTTP/1.1 server on
 * libuv whose answers depend on its --version, so a spec can tell which
 * version served a request and can make an instance unhealthy on purpose.
 *
 *   demo-app --port P --version V [--host 127.0.0.1]
 *            [--unhealthy-file PATH] [--delay-ms N]
 *            [--error-percent N] [--slow-ms N]
 *
 *   GET /, GET /version  200 "<version>\n"   (500 if the version contains "bad";
 *                                             N % of them 500 with --error-percent
 *                                             or a version containing "errN";
 *                                             N ms later with --slow-ms or a
 *                                             version containing "slowN")
 *   GET /healthz         200 "ok\n"          (500 if the version contains "bad"
 *                                             or PATH exists at request time)
 *   GET /metrics         Prometheus text: demo_requests_total{version,code}
 *                        (the answers of / and /version so far) and
 *                        demo_error_ratio{version} (the configured share)
 *   anything else        404; methods other than GET and HEAD get 405
 *
 * --delay-ms delays every answer; --slow-ms only those of / and /version,
 * so /healthz stays quick while real requests are slow. The errors are
 * spread exactly: of any k requests, floor(k * N / 100) fail.
 *
 * Keep-alive and pipelining work the way HAProxy and wrk expect: requests
 * are parsed incrementally, answered one at a time in order, and every
 * response carries Content-Length. A request head is capped at 16 KiB
 * (431 and close). SIGTERM or SIGINT stops accepting, closes idle
 * connections, lets in-flight responses finish and exits 0; a second signal
 * (or DRAIN_DEADLINE_MS) closes whatever is left. */
#include <uv.h>

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define REQUEST_CAP (16 * 1024)
#define VERSION_MAX 128
/* After our FIN, keep reading (and discarding) for this long before close,
 * so unread client bytes do not turn the close into a RST that could
 * destroy the response we just sent. */
#define LINGER_MS 1000
#define DRAIN_DEADLINE_MS 10000

enum conn_state {
  CONN_READING,    /* waiting for (the rest of) a request */
  CONN_RESPONDING, /* a response is delayed or being written; not reading */
  CONN_LINGERING,  /* shut down for writing, discarding input until EOF */
  CONN_CLOSING,    /* handles closing; freed when both are closed */
};

struct conn {
  uv_tcp_t tcp;
  uv_timer_t timer; /* --delay-ms, then the linger deadline */
  uv_write_t write_req;
  uv_shutdown_t shutdown_req;
  enum conn_state state;
  int handles_open;
  int reading;
  int close_after;
  int head_only;
  int status;
  const char *body;
  size_t len;        /* bytes of in[] holding unparsed input */
  uint64_t discard;  /* request body bytes still to skip */
  char out[2048 + VERSION_MAX];
  char in[REQUEST_CAP];
  struct conn *prev, *next;
};

static struct {
  const char *host;
  int port;
  const char *version;
  const char *unhealthy_file;
  uint64_t delay_ms;
  uint64_t slow_ms;          /* added to / and /version only */
  long error_percent;        /* of / and /version answered 500 */
  uint64_t served, ok_count, error_count;
  char metrics_body[1024 + 3 * VERSION_MAX];
  int bad;
  char version_body[VERSION_MAX + 2];
  char bad_body[VERSION_MAX + 16];

  uv_loop_t *loop;
  uv_tcp_t listener;
  uv_signal_t sigterm, sigint;
  uv_timer_t deadline;
  int draining;
  struct conn *conns;
} app;

static void process(struct conn *c);

static void on_handle_closed(uv_handle_t *handle) {
  struct conn *c = handle->data;
  c->handles_open--;
  if (c->handles_open == 0)
    free(c);
}

static void conn_close(struct conn *c) {
  if (c->state == CONN_CLOSING)
    return;
  c->state = CONN_CLOSING;
  if (c->prev)
    c->prev->next = c->next;
  else
    app.conns = c->next;
  if (c->next)
    c->next->prev = c->prev;
  c->prev = c->next = NULL;
  uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
  uv_close((uv_handle_t *)&c->timer, on_handle_closed);
}

static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf) {
  struct conn *c = handle->data;
  (void)suggested;
  if (c->state == CONN_LINGERING)
    *buf = uv_buf_init(c->in, sizeof c->in);
  else
    *buf = uv_buf_init(c->in + c->len, (unsigned)(sizeof c->in - c->len));
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);

static void reading_start(struct conn *c) {
  if (c->reading)
    return;
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0) {
    conn_close(c);
    return;
  }
  c->reading = 1;
}

static void reading_stop(struct conn *c) {
  if (!c->reading)
    return;
  uv_read_stop((uv_stream_t *)&c->tcp);
  c->reading = 0;
}

static void on_linger_timeout(uv_timer_t *timer) {
  conn_close(timer->data);
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  struct conn *c = req->data;
  if (c->state == CONN_CLOSING)
    return;
  if (status < 0) {
    conn_close(c);
    return;
  }
  reading_start(c);
  uv_timer_start(&c->timer, on_linger_timeout, LINGER_MS, 0);
}

static void linger_close(struct conn *c) {
  c->state = CONN_LINGERING;
  c->len = 0;
  c->shutdown_req.data = c;
  if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown) != 0)
    conn_close(c);
}

static void on_written(uv_write_t *req, int status) {
  struct conn *c = req->data;
  if (c->state == CONN_CLOSING)
    return;
  if (status < 0) {
    conn_close(c);
    return;
  }
  c->state = CONN_READING;
  if (c->close_after || app.draining)
    linger_close(c);
  else
    process(c);
}

static const char *reason(int status) {
  switch (status) {
  case 200: return "OK";
  case 400: return "Bad Request";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 505: return "HTTP Version Not Supported";
  default: return "Unknown";
  }
}

/* Built when the response is sent, not when the request was parsed, so a
 * drain that began during --delay-ms still says Connection: close. */
static void send_response(struct conn *c) {
  size_t body_len = strlen(c->body);
  int n;
  uv_buf_t buf;

  if (app.draining)
    c->close_after = 1;
  n = snprintf(c->out, sizeof c->out,
               "HTTP/1.1 %d %s\r\n"
               "Content-Type: text/plain\r\n"
               "Content-Length: %zu\r\n"
               "%s%s"
               "\r\n"
               "%s",
               c->status, reason(c->status), body_len,
               c->status == 405 ? "Allow: GET, HEAD\r\n" : "",
               c->close_after ? "Connection: close\r\n" : "",
               c->head_only ? "" : c->body);
  if (n < 0 || (size_t)n >= sizeof c->out) {
    conn_close(c);
    return;
  }
  buf = uv_buf_init(c->out, (unsigned)n);
  c->write_req.data = c;
  if (uv_write(&c->write_req, (uv_stream_t *)&c->tcp, &buf, 1, on_written) != 0)
    conn_close(c);
}

static void on_delay_done(uv_timer_t *timer) {
  send_response(timer->data);
}

static void respond_later(struct conn *c, int status, const char *body, uint64_t extra_ms) {
  reading_stop(c);
  c->state = CONN_RESPONDING;
  c->status = status;
  c->body = body;
  if (app.delay_ms + extra_ms > 0)
    uv_timer_start(&c->timer, on_delay_done, app.delay_ms + extra_ms, 0);
  else
    send_response(c);
}

static void respond(struct conn *c, int status, const char *body) { respond_later(c, status, body, 0); }

/* The k-th answer of / fails when floor(k N / 100) grows: exactly N % of
 * any run of answers, spread evenly. */
static int next_fails(void) {
  app.served++;
  return app.bad || (app.served * (uint64_t)app.error_percent) / 100 >
                        ((app.served - 1) * (uint64_t)app.error_percent) / 100;
}

static const char *metrics_text(void) {
  snprintf(app.metrics_body, sizeof app.metrics_body,
           "# HELP demo_requests_total Answers to / and /version, by version and status code.\n"
           "# TYPE demo_requests_total counter\n"
           "demo_requests_total{version=\"%s\",code=\"200\"} %llu\n"
           "demo_requests_total{version=\"%s\",code=\"500\"} %llu\n"
           "# HELP demo_error_ratio The share of / answered with 500, as configured.\n"
           "# TYPE demo_error_ratio gauge\n"
           "demo_error_ratio{version=\"%s\"} %g\n",
           app.version, (unsigned long long)app.ok_count, app.version, (unsigned long long)app.error_count,
           app.version, app.bad ? 1.0 : app.error_percent / 100.0);
  return app.metrics_body;
}

static void respond_error(struct conn *c, int status, const char *body) {
  c->close_after = 1;
  c->head_only = 0;
  c->len = 0;
  respond(c, status, body);
}

/* Does the comma-separated header value contain token (case-insensitive)? */
static int has_token(const char *value, size_t len, const char *token) {
  size_t tlen = strlen(token);
  size_t i = 0;
  while (i < len) {
    size_t start, end;
    while (i < len && (value[i] == ' ' || value[i] == '\t' || value[i] == ','))
      i++;
    start = i;
    while (i < len && value[i] != ',')
      i++;
    end = i;
    while (end > start && (value[end - 1] == ' ' || value[end - 1] == '\t'))
      end--;
    if (end - start == tlen && strncasecmp(value + start, token, tlen) == 0)
      return 1;
  }
  return 0;
}

static int parse_length(const char *value, size_t len, uint64_t *out) {
  uint64_t n = 0;
  size_t i = 0;
  while (i < len && (value[i] == ' ' || value[i] == '\t'))
    i++;
  if (i == len)
    return -1;
  for (; i < len && value[i] != ' ' && value[i] != '\t'; i++) {
    if (value[i] < '0' || value[i] > '9' || n > UINT64_MAX / 10 - 1)
      return -1;
    n = n * 10 + (uint64_t)(value[i] - '0');
  }
  for (; i < len; i++)
    if (value[i] != ' ' && value[i] != '\t')
      return -1;
  *out = n;
  return 0;
}

static int file_exists(const char *path) {
  return path != NULL && access(path, F_OK) == 0;
}

static void route(struct conn *c, const char *method, size_t mlen,
                  const char *target, size_t tlen) {
  size_t plen = 0;
  while (plen < tlen && target[plen] != '?')
    plen++;
  c->head_only = mlen == 4 && memcmp(method, "HEAD", 4) == 0;
  if (!c->head_only && !(mlen == 3 && memcmp(method, "GET", 3) == 0)) {
    respond(c, 405, "method not allowed\n");
    return;
  }
  if ((plen == 1 && target[0] == '/') ||
      (plen == 8 && memcmp(target, "/version", 8) == 0)) {
    if (next_fails()) {
      app.error_count++;
      respond_later(c, 500, app.bad_body, app.slow_ms);
    } else {
      app.ok_count++;
      respond_later(c, 200, app.version_body, app.slow_ms);
    }
    return;
  }
  if (plen == 8 && memcmp(target, "/metrics", 8) == 0) {
    respond(c, 200, metrics_text());
    return;
  }
  if (plen == 8 && memcmp(target, "/healthz", 8) == 0) {
    if (app.bad || file_exists(app.unhealthy_file))
      respond(c, 500, "unhealthy\n");
    else
      respond(c, 200, "ok\n");
    return;
  }
  respond(c, 404, "not found\n");
}

static void consume(struct conn *c, size_t n) {
  memmove(c->in, c->in + n, c->len - n);
  c->len -= n;
}

/* Parse one request from in[] and start answering it, or keep reading.
 * Called only in CONN_READING. */
static void process(struct conn *c) {
  const char *p, *end, *line_end, *sp1, *sp2;
  size_t head_len;
  uint64_t content_length = 0;
  int http10, keep_alive = 0, want_close = 0, chunked = 0, bad = 0;

  if (c->discard > 0) {
    size_t n = c->discard < c->len ? (size_t)c->discard : c->len;
    consume(c, n);
    c->discard -= n;
  }
  /* RFC 9112 §2.2: ignore empty lines before a request line. */
  while (c->len >= 2 && c->in[0] == '\r' && c->in[1] == '\n')
    consume(c, 2);

  end = memmem(c->in, c->len, "\r\n\r\n", 4);
  if (end == NULL) {
    if (c->len == sizeof c->in)
      respond_error(c, 431, "request too large\n");
    else
      reading_start(c);
    return;
  }
  head_len = (size_t)(end - c->in) + 4;

  line_end = memmem(c->in, head_len, "\r\n", 2);
  sp1 = memchr(c->in, ' ', (size_t)(line_end - c->in));
  sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1)) : NULL;
  if (sp1 == NULL || sp2 == NULL || sp1 == c->in || sp2 == sp1 + 1 ||
      line_end - sp2 - 1 != 8 || memcmp(sp2 + 1, "HTTP/1.", 7) != 0) {
    respond_error(c, 400, "bad request\n");
    return;
  }
  if (sp2[8] != '0' && sp2[8] != '1') {
    respond_error(c, 505, "http version not supported\n");
    return;
  }
  http10 = sp2[8] == '0';

  for (p = line_end + 2; p < end; ) {
    const char *eol = memmem(p, (size_t)(end + 2 - p), "\r\n", 2);
    const char *colon = memchr(p, ':', (size_t)(eol - p));
    const char *value;
    size_t nlen, vlen;
    if (colon == NULL || colon == p) {
      bad = 1;
      break;
    }
    nlen = (size_t)(colon - p);
    value = colon + 1;
    vlen = (size_t)(eol - value);
    if (nlen == 10 && strncasecmp(p, "Connection", 10) == 0) {
      want_close |= has_token(value, vlen, "close");
      keep_alive |= has_token(value, vlen, "keep-alive");
    } else if (nlen == 14 && strncasecmp(p, "Content-Length", 14) == 0) {
      if (parse_length(value, vlen, &content_length) != 0)
        bad = 1;
    } else if (nlen == 17 && strncasecmp(p, "Transfer-Encoding", 17) == 0) {
      chunked = 1;
    }
    p = eol + 2;
  }
  if (bad) {
    respond_error(c, 400, "bad request\n");
    return;
  }
  if (chunked) {
    /* A GET has no use for a body; not worth a chunked decoder. */
    respond_error(c, 501, "transfer-encoding not supported\n");
    return;
  }

  c->close_after = want_close || (http10 && !keep_alive);
  route(c, c->in, (size_t)(sp1 - c->in), sp1 + 1, (size_t)(sp2 - sp1 - 1));
  /* The route only keeps pointers to static bodies; the head can go. */
  consume(c, head_len);
  c->discard = content_length;
  if (c->discard > 0) {
    size_t n = c->discard < c->len ? (size_t)c->discard : c->len;
    consume(c, n);
    c->discard -= n;
  }
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  struct conn *c = stream->data;
  (void)buf;
  if (nread == 0 || c->state == CONN_CLOSING)
    return;
  if (nread < 0) {
    /* EOF or error: a half-received request is dropped, nothing to answer. */
    conn_close(c);
    return;
  }
  if (c->state == CONN_LINGERING)
    return;
  c->len += (size_t)nread;
  if (c->state == CONN_READING)
    process(c);
}

static void on_connection(uv_stream_t *server, int status) {
  struct conn *c;
  if (status < 0) {
    fprintf(stderr, "demo-app: accept: %s\n", uv_strerror(status));
    return;
  }
  c = calloc(1, sizeof *c);
  if (c == NULL) {
    fprintf(stderr, "demo-app: out of memory for a connection\n");
    return;
  }
  uv_tcp_init(app.loop, &c->tcp);
  uv_timer_init(app.loop, &c->timer);
  c->tcp.data = c;
  c->timer.data = c;
  c->handles_open = 2;
  c->state = CONN_READING;
  c->next = app.conns;
  if (app.conns)
    app.conns->prev = c;
  app.conns = c;
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
    conn_close(c);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  reading_start(c);
}

static void close_all(int idle_only) {
  struct conn *c = app.conns;
  while (c) {
    struct conn *next = c->next;
    if (!idle_only || c->state == CONN_READING)
      conn_close(c);
    c = next;
  }
}

static void on_deadline(uv_timer_t *timer) {
  (void)timer;
  close_all(0);
}

static void on_signal(uv_signal_t *handle, int signum) {
  (void)handle;
  if (app.draining) {
    close_all(0);
    return;
  }
  app.draining = 1;
  fprintf(stdout, "demo-app %s draining (signal %d)\n", app.version, signum);
  fflush(stdout);
  uv_close((uv_handle_t *)&app.listener, NULL);
  close_all(1);
  /* Neither the signal watchers nor the deadline keep the loop alive: it
   * ends as soon as the last in-flight response is out. */
  uv_timer_start(&app.deadline, on_deadline, DRAIN_DEADLINE_MS, 0);
  uv_unref((uv_handle_t *)&app.deadline);
  uv_unref((uv_handle_t *)&app.sigterm);
  uv_unref((uv_handle_t *)&app.sigint);
}

static void usage(const char *msg) {
  if (msg)
    fprintf(stderr, "demo-app: %s\n", msg);
  fprintf(stderr,
          "usage: demo-app --port P --version V [--host 127.0.0.1]\n"
          "                [--unhealthy-file PATH] [--delay-ms N]\n"
          "                [--error-percent N] [--slow-ms N]\n");
  exit(2);
}

static long parse_number(const char *s, const char *name, long max) {
  char *end;
  long v;
  errno = 0;
  v = strtol(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0' || v < 0 || v > max) {
    fprintf(stderr, "demo-app: %s must be a number in 0..%ld, got '%s'\n",
            name, max, s);
    exit(2);
  }
  return v;
}

static void parse_args(int argc, char **argv) {
  int i;
  app.host = "127.0.0.1";
  app.port = -1;
  for (i = 1; i < argc; i += 2) {  /* every option takes a value */
    const char *arg = argv[i];
    const char *val = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0)
      usage(NULL);
    if (val == NULL) {
      fprintf(stderr, "demo-app: %s needs a value\n", arg);
      usage(NULL);
    }
    if (strcmp(arg, "--port") == 0)
      app.port = (int)parse_number(val, "--port", 65535);
    else if (strcmp(arg, "--version") == 0)
      app.version = val;
    else if (strcmp(arg, "--host") == 0)
      app.host = val;
    else if (strcmp(arg, "--unhealthy-file") == 0)
      app.unhealthy_file = val;
    else if (strcmp(arg, "--delay-ms") == 0)
      app.delay_ms = (uint64_t)parse_number(val, "--delay-ms", 3600000);
    else if (strcmp(arg, "--slow-ms") == 0)
      app.slow_ms = (uint64_t)parse_number(val, "--slow-ms", 3600000);
    else if (strcmp(arg, "--error-percent") == 0)
      app.error_percent = parse_number(val, "--error-percent", 100);
    else {
      fprintf(stderr, "demo-app: unknown option '%s'\n", arg);
      usage(NULL);
    }
  }
  if (app.port < 0)
    usage("--port is required");
  if (app.version == NULL || app.version[0] == '\0')
    usage("--version is required (non-empty)");
  if (strlen(app.version) > VERSION_MAX) {
    fprintf(stderr, "demo-app: --version is longer than %d bytes\n", VERSION_MAX);
    exit(2);
  }
  app.bad = strstr(app.version, "bad") != NULL;
  /* Conventions of the version's name, for specs whose provider command
   * names only {version}: "2.0-err30" fails 30 %, "2.0-slow200" adds 200 ms. */
  const char *p = strstr(app.version, "err");
  if (p && p[3] >= '0' && p[3] <= '9' && app.error_percent == 0)
    app.error_percent = strtol(p + 3, NULL, 10) > 100 ? 100 : strtol(p + 3, NULL, 10);
  p = strstr(app.version, "slow");
  if (p && p[4] >= '0' && p[4] <= '9' && app.slow_ms == 0)
    app.slow_ms = (uint64_t)strtol(p + 4, NULL, 10);
  snprintf(app.version_body, sizeof app.version_body, "%s\n", app.version);
  snprintf(app.bad_body, sizeof app.bad_body, "bad version %s\n", app.version);
}

int main(int argc, char **argv) {
  struct sockaddr_storage addr;
  int addr_len = sizeof addr;
  int rc, port;

  parse_args(argc, argv);
  /* libuv writes with write(2): a peer gone mid-response must be EPIPE,
   * not a fatal signal. */
  signal(SIGPIPE, SIG_IGN);
  app.loop = uv_default_loop();

  memset(&addr, 0, sizeof addr);
  rc = uv_ip4_addr(app.host, app.port, (struct sockaddr_in *)&addr);
  if (rc != 0)
    rc = uv_ip6_addr(app.host, app.port, (struct sockaddr_in6 *)&addr);
  if (rc != 0) {
    fprintf(stderr, "demo-app: --host '%s' is not an IP address\n", app.host);
    return 2;
  }
  uv_tcp_init(app.loop, &app.listener);
  rc = uv_tcp_bind(&app.listener, (const struct sockaddr *)&addr, 0);
  if (rc == 0)
    rc = uv_listen((uv_stream_t *)&app.listener, 511, on_connection);
  if (rc != 0) {
    fprintf(stderr, "demo-app: cannot listen on %s:%d: %s\n", app.host,
            app.port, uv_strerror(rc));
    return 1;
  }
  port = app.port;
  if (uv_tcp_getsockname(&app.listener, (struct sockaddr *)&addr, &addr_len) == 0)
    port = ntohs(addr.ss_family == AF_INET6
                     ? ((struct sockaddr_in6 *)&addr)->sin6_port
                     : ((struct sockaddr_in *)&addr)->sin_port);

  uv_timer_init(app.loop, &app.deadline);
  uv_signal_init(app.loop, &app.sigterm);
  uv_signal_init(app.loop, &app.sigint);
  uv_signal_start(&app.sigterm, on_signal, SIGTERM);
  uv_signal_start(&app.sigint, on_signal, SIGINT);

  printf("demo-app %s listening on %s:%d\n", app.version, app.host, port);
  fflush(stdout);

  uv_run(app.loop, UV_RUN_DEFAULT);

  uv_close((uv_handle_t *)&app.deadline, NULL);
  uv_close((uv_handle_t *)&app.sigterm, NULL);
  uv_close((uv_handle_t *)&app.sigint, NULL);
  uv_run(app.loop, UV_RUN_DEFAULT);
  uv_loop_close(app.loop);
  printf("demo-app %s stopped\n", app.version);
  fflush(stdout);
  return 0;
}
