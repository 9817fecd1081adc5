/* The HTTP server of `deployctl serve`: the listening socket, HTTP/1.1
 * (and HTTP/2 over TLS), TLS itself, request bodies and streamed answers
 * (server-sent events), on the engine's libuv loop.
 *
 * It lives in the module deploy-httpd.so, built on h2o (Debian's
 * libh2o-dev, the libuv flavour), loaded on first use like deploy-git.so
 * and deploy-http.so: h2o brings libssl, libwslay and zlib, which no other
 * command needs. This header is the whole interface; what a request means
 * (routes, tokens, webhooks, JSON) is the core's business (serve.c).
 *
 * Every request handed to the handler gets exactly one answer through
 * httpd_respond or httpd_stream_open (or httpd_drop), now or later from
 * the loop. A client that goes away before the answer makes the late
 * answer a no-op; the request object stays valid until answered. */
#ifndef DEPLOY_HTTPD_H
#define DEPLOY_HTTPD_H

#include <stddef.h>

#include <uv.h>

typedef struct httpd httpd;
typedef struct httpd_req httpd_req;
typedef struct httpd_stream httpd_stream;

/* What the handler sees of a request: valid until it is answered. */
typedef struct httpd_request {
  const char *method;       /* "GET", NUL-terminated */
  const char *path;         /* decoded of nothing, without the query: "/api/v1/status" */
  const char *query;        /* after '?', "" when none */
  const char *body;         /* the whole body (capped at max_body), NUL-terminated */
  size_t body_len;
  const char *peer;         /* "127.0.0.1" */
} httpd_request;

typedef void (*httpd_handler)(void *payload, httpd_req *req, const httpd_request *r);

typedef struct httpd_opts {
  const char *host;         /* numeric address: "127.0.0.1", "::1", "0.0.0.0" */
  int port;                 /* 0: any free port (httpd_port says which) */
  const char *tls_cert;     /* PEM files; both or neither */
  const char *tls_key;
  size_t max_body;          /* a longer body is answered 413 before the handler sees it */
  httpd_handler handler;
  void *payload;
} httpd_opts;

typedef void (*httpd_closed_cb)(void *payload);

#define HTTPD_API_VERSION 1
typedef struct httpd_api {
  int version;
  /* Listens; -1 with err naming the address and why (in use, no such
   * address, a certificate that does not load). */
  int (*start)(httpd **out, uv_loop_t *loop, const httpd_opts *o, char *err);
  int (*port)(const httpd *h);
  /* Stops listening, asks every connection to close (streams end), and
   * calls done once everything is closed and freed. */
  void (*stop)(httpd *h, httpd_closed_cb done, void *payload);
  /* A request header (case-insensitive name), NULL when absent. The
   * value is not NUL-terminated: *len says how long it is. */
  const char *(*header)(httpd_req *req, const char *name, size_t *len);
  /* The answer. headers: name, value pairs, NULL-terminated (may be NULL). */
  void (*respond)(httpd_req *req, int status, const char *content_type, const char *const *headers,
                  const char *body, size_t len);
  /* A streamed answer (text/event-stream): written to as it comes, until
   * stream_close or the client leaves (on_gone then runs once, from the
   * loop, and the stream must not be used after it). */
  httpd_stream *(*stream_open)(httpd_req *req, const char *content_type, void (*on_gone)(void *payload),
                               void *payload);
  /* Queues bytes; -1 when the stream is gone or too far behind (more than
   * 1 MiB queued: a client that does not read is dropped). */
  int (*stream_write)(httpd_stream *s, const char *data, size_t len);
  /* Ends it from our side; on_gone does not run. */
  void (*stream_close)(httpd_stream *s);
} httpd_api;

/* The module's table, or NULL with err (see module.h). */
const httpd_api *httpd_load(char *err);

#endif
