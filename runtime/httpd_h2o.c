/* httpd.h on h2o (libh2o, its libuv flavour): h2o parses HTTP/1.1 and
 * HTTP/2, speaks TLS, caps request bodies (413) and keeps connections
 * alive; this file only binds it to the engine's loop and turns its
 * requests into httpd_request views. Built into deploy-httpd.so.
 *
 * Lifetimes: h2o frees a request (its memory pool) when its answer is
 * sent or its client leaves, whichever comes first, while our answer may
 * come later from the loop (a store read). So each request has a heap
 * httpd_req that h2o's pool points to through a disposer: whichever of
 * "answered" and "disposed" happens second frees it. */
#include "httpd.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include <h2o.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "util.h"

#define STREAM_MAX_QUEUED (1024 * 1024)

struct httpd {
  uv_loop_t *loop;
  h2o_globalconf_t config;
  h2o_context_t ctx;
  h2o_accept_ctx_t accept;
  SSL_CTX *ssl;
  uv_tcp_t listener;
  int listening;
  int port;
  httpd_handler handler;
  void *payload;
  size_t sockets;          /* accepted connections not yet closed */
  struct conn *conns;      /* those connections, to end idle ones at a stop */
  int stopping;
  uv_timer_t stop_timer;   /* waits for the connections to close */
  int stop_waits;
  httpd_closed_cb done;
  void *done_payload;
};

typedef struct handler_ext {
  h2o_handler_t super;
  httpd *h;
} handler_ext;

struct httpd_req {
  h2o_req_t *req;          /* NULL once h2o disposed of it */
  int answered;
};

struct httpd_stream {
  h2o_generator_t gen;     /* first: h2o hands it back */
  httpd_req *r;
  h2o_req_t *req;
  char *queued, *inflight;
  size_t nqueued, cap, ninflight;
  int sending;             /* an h2o_send waits for proceed */
  int closing;             /* closed by us: send the end once idle */
  int gone;                /* h2o stopped it */
  int final_sent;
  int notified;
  void (*on_gone)(void *payload);
  void *payload;
};

/* ---- requests ---- */

static void req_disposed(void *p) {
  httpd_req *r = *(httpd_req **)p;
  r->req = NULL;
  if (r->answered)
    free(r);
}

static const char *reason_of(int status) {
  switch (status) {
  case 200: return "OK";
  case 201: return "Created";
  case 202: return "Accepted";
  case 204: return "No Content";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 409: return "Conflict";
  case 413: return "Payload Too Large";
  case 415: return "Unsupported Media Type";
  case 429: return "Too Many Requests";
  case 500: return "Internal Server Error";
  case 503: return "Service Unavailable";
  default: return "Status";
  }
}

static char *pool_str(h2o_mem_pool_t *pool, const char *s, size_t len) {
  char *out = h2o_mem_alloc_pool(pool, len + 1);
  if (len)
    memcpy(out, s, len);
  out[len] = '\0';
  return out;
}

static int on_req(h2o_handler_t *self, h2o_req_t *req) {
  httpd *h = ((handler_ext *)self)->h;
  httpd_req *r = calloc(1, sizeof *r);
  if (!r)
    return -1;
  r->req = req;
  httpd_req **link = h2o_mem_alloc_shared(&req->pool, sizeof *link, req_disposed);
  *link = r;
  size_t path_len = req->query_at != SIZE_MAX ? req->query_at : req->path.len;
  httpd_request v = {0};
  v.method = pool_str(&req->pool, req->method.base, req->method.len);
  v.path = pool_str(&req->pool, req->path.base, path_len);
  v.query = req->query_at != SIZE_MAX
                ? pool_str(&req->pool, req->path.base + req->query_at + 1, req->path.len - req->query_at - 1)
                : "";
  v.body = pool_str(&req->pool, req->entity.base ? req->entity.base : "", req->entity.base ? req->entity.len : 0);
  v.body_len = req->entity.base ? req->entity.len : 0;
  char peer[64] = "";
  struct sockaddr_storage ss;
  if (req->conn->callbacks->get_peername && req->conn->callbacks->get_peername(req->conn, (struct sockaddr *)&ss) > 0) {
    if (ss.ss_family == AF_INET)
      uv_ip4_name((struct sockaddr_in *)&ss, peer, sizeof peer);
    else if (ss.ss_family == AF_INET6)
      uv_ip6_name((struct sockaddr_in6 *)&ss, peer, sizeof peer);
  }
  v.peer = pool_str(&req->pool, peer, strlen(peer));
  h->handler(h->payload, r, &v);
  return 0;
}

static const char *hd_header(httpd_req *r, const char *name, size_t *len) {
  if (!r->req)
    return NULL;
  size_t n = strlen(name);
  const h2o_headers_t *hs = &r->req->headers;
  for (size_t i = 0; i < hs->size; i++) {
    const h2o_header_t *hd = &hs->entries[i];
    if (hd->name->len == n && strncasecmp(hd->name->base, name, n) == 0) {
      *len = hd->value.len;
      return hd->value.base;
    }
  }
  return NULL;
}

static void set_headers(h2o_req_t *req, int status, const char *content_type, const char *const *headers) {
  req->res.status = status;
  req->res.reason = reason_of(status);
  if (content_type)
    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, content_type, strlen(content_type));
  for (size_t i = 0; headers && headers[i] && headers[i + 1]; i += 2)
    h2o_add_header_by_str(&req->pool, &req->res.headers, headers[i], strlen(headers[i]), 1, NULL, headers[i + 1],
                          strlen(headers[i + 1]));
}

static void hd_respond(httpd_req *r, int status, const char *content_type, const char *const *headers,
                       const char *body, size_t len) {
  if (r->answered)
    return;
  r->answered = 1;
  h2o_req_t *req = r->req;
  if (!req) {
    free(r);
    return;
  }
  set_headers(req, status, content_type, headers);
  /* Copies the body; the request (and r) may be disposed of inside. */
  h2o_send_inline(req, body ? body : "", body ? len : 0);
}

/* ---- streams ---- */

static void stream_send(httpd_stream *s) {
  if (s->sending || s->gone || !s->req || s->final_sent)
    return;
  if (s->nqueued == 0 && !s->closing)
    return;
  free(s->inflight);
  s->inflight = s->queued;
  s->ninflight = s->nqueued;
  s->queued = NULL;
  s->nqueued = s->cap = 0;
  h2o_iovec_t buf = h2o_iovec_init(s->inflight ? s->inflight : "", s->ninflight);
  s->sending = 1;
  s->final_sent = s->closing;
  /* The request may be disposed of inside (a final send): nothing of s is
   * touched after. */
  h2o_send(s->req, &buf, s->ninflight ? 1 : 0, s->final_sent ? H2O_SEND_STATE_FINAL : H2O_SEND_STATE_IN_PROGRESS);
}

static void stream_proceed(h2o_generator_t *g, h2o_req_t *req) {
  httpd_stream *s = (httpd_stream *)g;
  s->sending = 0;
  free(s->inflight);
  s->inflight = NULL;
  s->ninflight = 0;
  stream_send(s);
}

static void stream_stop(h2o_generator_t *g, h2o_req_t *req) {
  httpd_stream *s = (httpd_stream *)g;
  s->gone = 1;
}

static void stream_disposed(void *p) {
  httpd_stream *s = p;
  s->req = NULL;
  s->gone = 1;
  free(s->queued);
  free(s->inflight);
  s->queued = s->inflight = NULL;
  if (!s->closing && !s->notified && s->on_gone) {
    s->notified = 1;
    s->on_gone(s->payload);
  }
}

static httpd_stream *hd_stream_open(httpd_req *r, const char *content_type, void (*on_gone)(void *), void *payload) {
  if (r->answered)
    return NULL;
  r->answered = 1;
  h2o_req_t *req = r->req;
  if (!req) {
    free(r);
    return NULL;
  }
  httpd_stream *s = h2o_mem_alloc_shared(&req->pool, sizeof *s, stream_disposed);
  memset(s, 0, sizeof *s);
  s->gen.proceed = stream_proceed;
  s->gen.stop = stream_stop;
  s->req = req;
  s->r = r;
  s->on_gone = on_gone;
  s->payload = payload;
  static const char *const hs[] = {"cache-control", "no-cache", "x-accel-buffering", "no", NULL};
  set_headers(req, 200, content_type, hs);
  h2o_start_response(req, &s->gen);
  /* The headers go out at once, with nothing else. */
  s->sending = 1;
  h2o_send(req, NULL, 0, H2O_SEND_STATE_IN_PROGRESS);
  return s;
}

static int hd_stream_write(httpd_stream *s, const char *data, size_t len) {
  if (!s || s->gone || s->closing || !s->req)
    return -1;
  if (s->nqueued + len > STREAM_MAX_QUEUED)
    return -1;
  if (s->nqueued + len > s->cap) {
    size_t cap = s->cap ? s->cap : 4096;
    while (cap < s->nqueued + len)
      cap *= 2;
    char *q = realloc(s->queued, cap);
    if (!q)
      return -1;
    s->queued = q;
    s->cap = cap;
  }
  memcpy(s->queued + s->nqueued, data, len);
  s->nqueued += len;
  stream_send(s);
  return 0;
}

static void hd_stream_close(httpd_stream *s) {
  if (!s || s->closing)
    return;
  s->closing = 1;
  if (!s->gone && s->req)
    stream_send(s);
}

/* ---- connections ---- */

/* h2o takes the handle's data field for itself: our pointer lives beside
 * the handle. */
typedef struct conn {
  uv_tcp_t tcp; /* first: the handle is the conn */
  httpd *h;
  struct conn *prev, *next;
} conn;

static void socket_closed(uv_handle_t *handle) {
  conn *c = (conn *)handle;
  c->h->sockets--;
  if (c->prev)
    c->prev->next = c->next;
  else
    c->h->conns = c->next;
  if (c->next)
    c->next->prev = c->prev;
  free(c);
}

static void on_accept(uv_stream_t *listener, int status) {
  httpd *h = listener->data;
  if (status != 0 || h->stopping)
    return;
  conn *c = calloc(1, sizeof *c);
  if (!c)
    return;
  uv_tcp_init(listener->loop, &c->tcp);
  c->h = h;
  h->sockets++;
  c->next = h->conns;
  if (h->conns)
    h->conns->prev = c;
  h->conns = c;
  if (uv_accept(listener, (uv_stream_t *)&c->tcp) != 0) {
    uv_close((uv_handle_t *)&c->tcp, socket_closed);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  h2o_socket_t *sock = h2o_uv_socket_create((uv_stream_t *)&c->tcp, socket_closed);
  h2o_accept(&h->accept, sock);
}

static int load_tls(httpd *h, const httpd_opts *o, char *err) {
  h->ssl = SSL_CTX_new(TLS_server_method());
  if (!h->ssl) {
    dc_fmt(err, DC_ERR_MAX, "serve: TLS: cannot create a context (OpenSSL)");
    return -1;
  }
  SSL_CTX_set_min_proto_version(h->ssl, TLS1_2_VERSION);
  SSL_CTX_set_options(h->ssl, SSL_OP_NO_COMPRESSION);
  char why[256] = "";
  if (SSL_CTX_use_certificate_chain_file(h->ssl, o->tls_cert) != 1) {
    ERR_error_string_n(ERR_get_error(), why, sizeof why);
    dc_fmt(err, DC_ERR_MAX, "serve: TLS: cannot load the certificate '%s' (%s): give a PEM certificate chain",
           o->tls_cert, why);
    return -1;
  }
  if (SSL_CTX_use_PrivateKey_file(h->ssl, o->tls_key, SSL_FILETYPE_PEM) != 1) {
    ERR_error_string_n(ERR_get_error(), why, sizeof why);
    dc_fmt(err, DC_ERR_MAX, "serve: TLS: cannot load the key '%s' (%s): give the PEM private key of the certificate",
           o->tls_key, why);
    return -1;
  }
  if (SSL_CTX_check_private_key(h->ssl) != 1) {
    dc_fmt(err, DC_ERR_MAX, "serve: TLS: the key '%s' does not belong to the certificate '%s'", o->tls_key,
           o->tls_cert);
    return -1;
  }
  h2o_ssl_register_alpn_protocols(h->ssl, h2o_http2_alpn_protocols);
  h->accept.ssl_ctx = h->ssl;
  return 0;
}

static int listen_on(httpd *h, const httpd_opts *o, char *err) {
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof ss);
  if (uv_ip4_addr(o->host, o->port, (struct sockaddr_in *)&ss) != 0 &&
      uv_ip6_addr(o->host, o->port, (struct sockaddr_in6 *)&ss) != 0) {
    dc_fmt(err, DC_ERR_MAX, "serve: --listen: '%s' is not a numeric IPv4 or IPv6 address (e.g. 127.0.0.1:9753, "
           "[::1]:9753)", o->host);
    return -1;
  }
  uv_tcp_init(h->loop, &h->listener);
  h->listener.data = h;
  h->listening = 1;
  int rc = uv_tcp_bind(&h->listener, (struct sockaddr *)&ss, 0);
  if (rc == 0)
    rc = uv_listen((uv_stream_t *)&h->listener, 128, on_accept);
  if (rc != 0) {
    dc_fmt(err, DC_ERR_MAX, "serve: cannot listen on %s port %d: %s%s", o->host, o->port, uv_strerror(rc),
           rc == UV_EADDRINUSE ? " (another process has it: choose another --listen port)" : "");
    return -1;
  }
  struct sockaddr_storage bound;
  int len = sizeof bound;
  if (uv_tcp_getsockname(&h->listener, (struct sockaddr *)&bound, &len) == 0)
    h->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                 : ((struct sockaddr_in *)&bound)->sin_port);
  return 0;
}

static void free_httpd(httpd *h) {
  if (h->ssl)
    SSL_CTX_free(h->ssl);
  free(h);
}

static void listener_closed(uv_handle_t *handle) {
  httpd *h = handle->data;
  h->listening = 0;
}

static void stop_timer_closed(uv_handle_t *handle) {
  httpd *h = handle->data;
  httpd_closed_cb done = h->done;
  void *payload = h->done_payload;
  /* The shutdown request arms HTTP/2's graceful-shutdown timer even with
   * no connection left; the context must be idle to be disposed of. */
  if (h2o_timeout_is_linked(&h->ctx.http2._graceful_shutdown_timeout))
    h2o_timeout_unlink(&h->ctx.http2._graceful_shutdown_timeout);
  h2o_context_dispose(&h->ctx);
  h2o_config_dispose(&h->config);
  free_httpd(h);
  if (done)
    done(payload);
}

/* Connections close once their answer is out (h2o's graceful shutdown);
 * h2o's own handles close with the context once none is left. */
static void stop_tick(uv_timer_t *t) {
  httpd *h = t->data;
  if ((h->sockets > 0 || h->listening) && ++h->stop_waits < 500)
    return;
  uv_timer_stop(t);
  uv_close((uv_handle_t *)t, stop_timer_closed);
}

/* An idle keep-alive connection (a Prometheus scraping, a browser) would
 * wait for its next request. Its reading side is shut down: h2o reads that
 * as the client leaving and closes it through its own path, at once when
 * idle, after its answer when one is under way (writes still go out). */
static void end_reads(httpd *h) {
  for (conn *c = h->conns; c; c = c->next) {
    uv_os_fd_t fd;
    if (uv_fileno((uv_handle_t *)&c->tcp, &fd) == 0)
      shutdown(fd, SHUT_RD);
  }
}

static void hd_stop(httpd *h, httpd_closed_cb done, void *payload) {
  if (h->stopping)
    return;
  h->stopping = 1;
  h->done = done;
  h->done_payload = payload;
  if (h->listening)
    uv_close((uv_handle_t *)&h->listener, listener_closed);
  h2o_context_request_shutdown(&h->ctx);
  end_reads(h);
  uv_timer_init(h->loop, &h->stop_timer);
  h->stop_timer.data = h;
  uv_timer_start(&h->stop_timer, stop_tick, 0, 10);
}

static int hd_port(const httpd *h) { return h->port; }

static int hd_start(httpd **out, uv_loop_t *loop, const httpd_opts *o, char *err) {
  *out = NULL;
  if (!o->handler || !o->host || o->port < 0 || o->port > 65535) {
    dc_fmt(err, DC_ERR_MAX, "serve: bad server options");
    return -1;
  }
  if ((o->tls_cert == NULL) != (o->tls_key == NULL)) {
    dc_fmt(err, DC_ERR_MAX, "serve: TLS needs both a certificate and its key (--tls-cert and --tls-key)");
    return -1;
  }
  httpd *h = calloc(1, sizeof *h);
  if (!h) {
    dc_fmt(err, DC_ERR_MAX, "serve: out of memory");
    return -1;
  }
  h->loop = loop;
  h->handler = o->handler;
  h->payload = o->payload;
  if (o->tls_cert && load_tls(h, o, err) != 0) {
    free_httpd(h);
    return -1;
  }
  h2o_config_init(&h->config);
  h->config.max_request_entity_size = o->max_body;
  h->config.server_name = h2o_iovec_init(H2O_STRLIT("deployctl"));
  h2o_hostconf_t *host = h2o_config_register_host(&h->config, h2o_iovec_init(H2O_STRLIT("default")), 65535);
  h2o_pathconf_t *path = h2o_config_register_path(host, "/", 0);
  handler_ext *he = (handler_ext *)h2o_create_handler(path, sizeof *he);
  he->super.on_req = on_req;
  he->h = h;
  h2o_context_init(&h->ctx, loop, &h->config);
  h->accept.ctx = &h->ctx;
  h->accept.hosts = h->config.hosts;
  if (listen_on(h, o, err) != 0) {
    /* Tear down through the same path as a stop: h2o's handles close on
     * the loop. */
    hd_stop(h, NULL, NULL);
    return -1;
  }
  *out = h;
  return 0;
}

__attribute__((visibility("default"))) const httpd_api deploy_httpd_api = {
    .version = HTTPD_API_VERSION,
    .start = hd_start,
    .port = hd_port,
    .stop = hd_stop,
    .header = hd_header,
    .respond = hd_respond,
    .stream_open = hd_stream_open,
    .stream_write = hd_stream_write,
    .stream_close = hd_stream_close,
};
