/* libcurl's multi interface driven by the engine's libuv loop
 * (curl_multi_socket_action from uv_poll handles and one uv_timer, as in
 * curl's multi-uv example). All HTTP in deployctl goes through here. */
#ifndef DEPLOY_HTTP_H
#define DEPLOY_HTTP_H

#include <curl/curl.h>
#include <uv.h>

#include "engine.h"
#include "health.h"

typedef struct http http;

/* Called once per transfer when it ends. result is CURLE_OK or a curl error;
 * the easy handle still belongs to the caller (http does not clean it up). */
typedef void (*http_done_cb)(CURL *easy, CURLcode result, void *payload);

http *http_new(uv_loop_t *loop);
/* Abort every transfer in flight (their callbacks run with
 * CURLE_ABORTED_BY_CALLBACK), close the poll handles and the timer, free. */
void http_free(http *h);
/* Start a transfer. The caller configured `easy` (URL, timeouts, ...);
 * http sets CURLOPT_NOSIGNAL and CURLOPT_PRIVATE. Returns 0 or -1. */
int http_add(http *h, CURL *easy, http_done_cb cb, void *payload);
/* Transfers still in flight. */
int http_active(const http *h);
/* Stops a transfer started with http_add before it ends: its callback
 * never runs, the easy handle is the caller's again. Safe from inside
 * another transfer's callback. -1 when it is not in flight (any more), or
 * h is being freed (then its callback runs, with CURLE_ABORTED_BY_CALLBACK). */
int http_remove(http *h, CURL *easy);

/* The module's parts, reached from its table (httpreq.c). */
int healthcheck_start(engine *e, const char *const *urls, size_t n, const health_opts *opts, health_cb cb,
                      void *payload, char *err);

/* The engine's client, made on first use and freed with the engine: one
 * multi handle per loop for every request of the module. NULL when it
 * cannot be made. */
struct engine;
http *http_engine_client(struct engine *e);

#endif
