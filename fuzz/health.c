/* HTTP answers as a health check reads them: the real check
 * (runtime/healthcheck.c on the libcurl-on-libuv client of runtime/http.c,
 * the HTTP module's code linked in) against a server on the same loop
 * that answers the check's GET with the input, byte for byte, and closes.
 * libcurl parses the status line and headers; what is ours is what comes
 * around it (the body cap, the status compared, the failure described,
 * the result handed back once) and the client driving curl from the loop.
 *
 * Everything stays in the process: one listening socket on 127.0.0.1 made
 * at start, one loopback connection per input, no sleeping. The server
 * reads the whole request before it answers and half-closes after the
 * answer, so every input ends at once: by the answer being complete, or
 * by the end of the stream. */
#include "fuzz.h"

#include "engine.h"
#include "health.h"
#include "http_module.h"
#include "util.h"

extern const http_module_api deploy_http_api;

static engine eng;
static uv_tcp_t server;
static char url[64];
static const uint8_t *answer;
static size_t answer_len;
static int open_conns;

typedef struct conn {
  uv_tcp_t tcp;
  uv_write_t wr;
  uv_shutdown_t sh;
  char req[4096];
  size_t len;
  int answered;
  char *copy;
} conn;

static void conn_closed(uv_handle_t *h) {
  conn *c = h->data;
  free(c->copy);
  free(c);
  open_conns--;
}

static void conn_close(conn *c) {
  if (!uv_is_closing((uv_handle_t *)&c->tcp))
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  (void)hint;
  conn *c = h->data;
  /* After the request, whatever else comes is read over the same bytes. */
  size_t at = c->answered || c->len >= sizeof c->req - 1 ? 0 : c->len;
  *buf = uv_buf_init(c->req + at, (unsigned)(sizeof c->req - 1 - at));
}

static void on_written(uv_write_t *w, int status) {
  (void)w;
  (void)status;
}

static void on_shutdown(uv_shutdown_t *s, int status) {
  (void)s;
  (void)status;
}

static void answer_request(conn *c) {
  c->answered = 1;
  if (answer_len > 0) {
    c->copy = malloc(answer_len);
    if (!c->copy)
      abort();
    memcpy(c->copy, answer, answer_len);
    uv_buf_t b = uv_buf_init(c->copy, (unsigned)answer_len);
    if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0) {
      conn_close(c);
      return;
    }
  }
  /* Queued after the write: the client reads the answer, then the end. */
  if (uv_shutdown(&c->sh, (uv_stream_t *)&c->tcp, on_shutdown) != 0)
    conn_close(c);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  conn *c = s->data;
  if (nread < 0) {
    conn_close(c);
    return;
  }
  if (c->answered || nread == 0)
    return;
  c->len += (size_t)nread;
  c->req[c->len] = '\0';
  if (strstr(c->req, "\r\n\r\n") || c->len >= sizeof c->req - 1)
    answer_request(c);
}

static void on_connection(uv_stream_t *srv, int status) {
  if (status < 0)
    return;
  conn *c = calloc(1, sizeof *c);
  if (!c)
    abort();
  uv_tcp_init(eng.loop, &c->tcp);
  c->tcp.data = c;
  open_conns++;
  if (uv_accept(srv, (uv_stream_t *)&c->tcp) != 0 ||
      uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0)
    conn_close(c);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  struct sockaddr_in addr;
  struct sockaddr_storage bound;
  int len = sizeof bound;
  if (engine_init(&eng, 0) != 0 || uv_tcp_init(eng.loop, &server) != 0 ||
      uv_ip4_addr("127.0.0.1", 0, &addr) != 0 || uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0) != 0 ||
      uv_listen((uv_stream_t *)&server, 128, on_connection) != 0 ||
      uv_tcp_getsockname(&server, (struct sockaddr *)&bound, &len) != 0)
    abort();
  /* The listener is not work of the loop's: it runs until a check is done. */
  uv_unref((uv_handle_t *)&server);
  dc_fmt(url, sizeof url, "http://127.0.0.1:%d/healthz", ntohs(((struct sockaddr_in *)&bound)->sin_port));
  return 0;
}

typedef struct outcome {
  int calls;
  health_result r;
  size_t n;
} outcome;

static void on_checked(void *payload, const health_result *results, size_t n) {
  outcome *o = payload;
  o->calls++;
  o->n = n;
  if (n == 1) {
    o->r = results[0];
    FUZZ_CHECK(strcmp(results[0].url, url) == 0);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *urls[] = {url};
  health_opts opts = {.timeout = 5, .expect_status = 200};
  outcome o;
  char err[DC_ERR_MAX];
  memset(&o, 0, sizeof o);
  answer = data;
  answer_len = size;
  FUZZ_CHECK(deploy_http_api.check_start(&eng, urls, 1, &opts, on_checked, &o, err) == 0);
  while (o.calls == 0 || open_conns > 0)
    uv_run(eng.loop, UV_RUN_ONCE);
  FUZZ_CHECK(o.calls == 1 && o.n == 1);
  FUZZ_CHECK(o.r.ok == (o.r.status == 200 && o.r.error[0] == '\0'));
  if (!o.r.ok)
    FUZZ_CHECK(o.r.error[0] != '\0');
  /* No range on the status: libcurl hands on what its lenient reading of
   * the status line gives ("HTTP/204 40" is 4, a long "HTTP/222..." is
   * negative); ours is only to compare it with the one expected. */
  FUZZ_CHECK(health_classify(&o.r, 1) == (o.r.ok ? HEALTH_HEALTHY : HEALTH_UNHEALTHY));
  return 0;
}
