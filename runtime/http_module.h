/* The HTTP module's interface (deploy-http.so, libcurl; see module.h):
 * one versioned table for everything that needs libcurl. The core reaches
 * it through http_module() (httpreq_load.c); health.c and httpreq_load.c
 * forward to it. Both ask for the same version: the module is loaded and
 * checked once per process. */
#ifndef DEPLOY_HTTP_MODULE_H
#define DEPLOY_HTTP_MODULE_H

#include "health.h"
#include "httpreq.h"

/* 2: request_start and request_cancel joined the health checks. */
#define HTTP_MODULE_API_VERSION 2

typedef struct http_module_api {
  int version;
  int (*check_start)(engine *e, const char *const *urls, size_t n, const health_opts *opts, health_cb cb,
                     void *payload, char *err);
  /* As httpreq_start, minus the virtual clock's hold (the core's part). */
  int (*request_start)(void **out, engine *e, const httpreq_opts *o, httpreq_cb cb, void *payload, char *err);
  void (*request_cancel)(void *req);
} http_module_api;

/* The module's table, loaded on first use; NULL with err naming the file
 * and the fix. */
const http_module_api *http_module(char *err);

#endif
