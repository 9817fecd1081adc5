/* The text of the nginx router's include (nginx.c): what it writes for a
 * plan, and what a file it wrote says. Pure text, no I/O.
 *
 * The include declares, at http level of nginx.conf:
 *   upstream NAME                 the weighted split (proxy_pass http://NAME);
 *   map ... $deployctl_VAR        the upstream a request goes to: NAME, or
 *                                 NAME__deployctl_new (the fresh servers
 *                                 alone) for testers and sticky clients
 *                                 (proxy_pass http://$deployctl_VAR);
 *   map ... $deployctl_VAR_cookie the Set-Cookie of a sticky canary, for
 *                                 answers of fresh servers (add_header);
 *   a server on a unix socket     answering the file's generation, which
 *                                 confirms a reload (nginx.c);
 *   a server on another socket    answering 503 with the maintenance page,
 *                                 which upstream NAME points to while in
 *                                 maintenance.
 * VAR is NAME with '-' and '.' written '_' (nginx variable names allow
 * neither). When routes are on, a comment line holds them as JSON, so that
 * a file reads back to exactly the plan that wrote it. */
#ifndef DEPLOY_NGINX_INCLUDE_H
#define DEPLOY_NGINX_INCLUDE_H

#include <stddef.h>
#include <sys/un.h>

#include "router.h"

#define NGX_NAME_MAX 64              /* upstream and server names */
#define NGX_SOCK_MAX sizeof(((struct sockaddr_un *)0)->sun_path)

typedef struct ngx_names {
  char upstream[NGX_NAME_MAX];
  char var[NGX_NAME_MAX + 16];       /* "deployctl_" + NAME, '-' and '.' as '_' */
  char sock[NGX_SOCK_MAX];           /* the generation socket */
  char maint_sock[NGX_SOCK_MAX];     /* the maintenance socket */
  const char *path;                  /* the include, for messages */
} ngx_names;

/* The names of an upstream whose include lives in dir: -1 with err when a
 * socket path would not fit in a unix socket address. */
int nginx_include_names(ngx_names *nm, const char *dir, const char *upstream, char *err);

/* The include for these servers and routes at generation gen (heap, *len
 * bytes); NULL when out of memory. legacy: the form deployctl wrote before
 * routes existed (no maps), read back from files it left. */
char *nginx_include_render(const ngx_names *nm, const char *gen, const router_server *s, size_t ns,
                           const route_rules *routes, int legacy, size_t *len);

/* What the file says: its servers and routes, when it is exactly what
 * render writes for them (either form); anything else is an error naming
 * the file and the first line that differs. *out is heap. */
int nginx_include_parse(const ngx_names *nm, const char *text, size_t len, router_server **out, size_t *nout,
                        route_rules *routes, char *err);

/* The generation from the header line ("" when there is none). */
void nginx_include_generation(const char *text, size_t len, char *gen, size_t size);

/* The servers of the weighted upstream, leniently (a file that is not
 * quite ours still says which servers it had). *out is heap. */
int nginx_include_servers(const char *text, size_t len, router_server **out, size_t *n);

#endif
