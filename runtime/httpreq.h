/* One HTTP request on the engine's libcurl multi, for what deployctl sends
 * on its own behalf and for Lua (deploy.http.request, webhooks,
 * notifications). It never blocks: the answer comes through a callback
 * from the loop. The request itself lives in the HTTP module
 * (deploy-http.so, libcurl, loaded on first use: see module.h); the core
 * forwards to it and holds the virtual clock while a request is out.
 *
 * What is refused, with an error kind a caller can act on: a URL that is
 * not http(s)://host..., an answer whose body is larger than max_body
 * (cut off there, never truncated silently) or whose headers pass 64 KiB,
 * a request that takes longer than timeout (connecting included). A
 * redirect is an answer like any other (3xx, with its location header):
 * nothing is followed. */
#ifndef DEPLOY_HTTPREQ_H
#define DEPLOY_HTTPREQ_H

#include <stddef.h>

#include "engine.h"

#define HTTPREQ_DEFAULT_TIMEOUT 10.0
#define HTTPREQ_MAX_TIMEOUT 600.0
#define HTTPREQ_DEFAULT_MAX_BODY (1024 * 1024)
#define HTTPREQ_MAX_BODY_LIMIT (64 * 1024 * 1024)
#define HTTPREQ_MAX_HEADER_BYTES (64 * 1024)
#define HTTPREQ_MAX_HEADERS 100      /* request headers a caller may set */

typedef enum {
  HTTPREQ_OK = 0,       /* an answer came, whatever its status */
  HTTPREQ_BAD_URL,      /* not http(s)://host[:port]/...: nothing was sent */
  HTTPREQ_TIMEOUT,      /* no whole answer within the timeout */
  HTTPREQ_REFUSED,      /* nothing listens there */
  HTTPREQ_TOO_LARGE,    /* the body passed max_body, or the headers 64 KiB */
  HTTPREQ_FAILED,       /* anything else: name resolution, TLS, a reset, a malformed answer */
  HTTPREQ_BAD_REQUEST,  /* a method or header that cannot be sent: nothing was sent */
} httpreq_error;

typedef struct httpreq_header {
  const char *name;
  const char *value;
} httpreq_header;

typedef struct httpreq_opts {
  const char *method;              /* "GET" (default), "POST", ...: upper-case letters */
  const char *url;
  const httpreq_header *headers;   /* names are tokens, values hold no CR, LF or NUL */
  size_t nheaders;
  const char *body;                /* NULL: none */
  size_t body_len;
  double timeout;                  /* seconds for the whole request; 0: HTTPREQ_DEFAULT_TIMEOUT */
  size_t max_body;                 /* bytes; 0: HTTPREQ_DEFAULT_MAX_BODY */
  const char *user_agent;          /* NULL: "deployctl/1" */
} httpreq_opts;

/* Valid during the callback only. */
typedef struct httpreq_response {
  httpreq_error error;
  const char *message;             /* why, when error != HTTPREQ_OK ("timeout after 5 s") */
  long status;                     /* 0 without an answer */
  const httpreq_header *headers;   /* the answer's, names in lower case, in order */
  size_t nheaders;
  const char *body;                /* NUL-terminated as well */
  size_t body_len;
  double duration;                 /* seconds */
} httpreq_response;

typedef struct httpreq httpreq;
typedef void (*httpreq_cb)(void *payload, const httpreq_response *res);

/* Starts the request. 0: cb runs exactly once, later, from the loop
 * (unless cancelled). Otherwise an httpreq_error (HTTPREQ_BAD_URL,
 * HTTPREQ_BAD_REQUEST for a method or header that cannot be sent,
 * HTTPREQ_FAILED when the module cannot be loaded or memory runs out) with err filled; nothing
 * was sent and cb never runs. *out may be NULL when the caller never
 * cancels. */
int httpreq_start(httpreq **out, engine *e, const httpreq_opts *o, httpreq_cb cb, void *payload, char *err);
/* Stops a request whose callback has not run yet: it never runs. NULL-safe. */
void httpreq_cancel(httpreq *r);

/* "timeout", "refused", ...: the kind as a word, for Lua and events. */
const char *httpreq_error_name(httpreq_error e);

#endif
