#include "nginx_include.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "util.h"

/* nginx refuses an upstream without servers; this one is marked down, so
 * an empty upstream serves none of ours (nginx answers 502). */
#define PLACEHOLDER_HOST "127.0.0.1"
#define PLACEHOLDER_PORT 1
#define PLACEHOLDER_NAME "(none)"
#define MAINT_NAME "(maintenance)"
#define NEW_SUFFIX "__deployctl_new"
#define ROUTES_LEAD "# routes: "

int nginx_include_names(ngx_names *nm, const char *dir, const char *upstream, char *err) {
  memset(nm, 0, sizeof *nm);
  dc_strlcpy(nm->upstream, upstream, sizeof nm->upstream);
  dc_fmt(nm->var, sizeof nm->var, "deployctl_%s", upstream);
  for (char *c = nm->var; *c; c++)
    if (*c == '-' || *c == '.')
      *c = '_';
  int a = snprintf(nm->sock, sizeof nm->sock, "%s/%s.gen.sock", dir, upstream);
  int b = snprintf(nm->maint_sock, sizeof nm->maint_sock, "%s/%s.maint.sock", dir, upstream);
  if (a < 0 || b < 0 || (size_t)a >= sizeof nm->sock || (size_t)b >= sizeof nm->maint_sock) {
    dc_fmt(err, DC_ERR_MAX,
           "nginx: the router's sockets %s/%s.gen.sock and .maint.sock would be longer than a unix socket path "
           "may be (%zu bytes): put router.include in a shorter directory",
           dir, upstream, NGX_SOCK_MAX - 1);
    return DC_ERROR;
  }
  return DC_OK;
}

static int is_ipv6(const char *host) {
  unsigned char bin[16];
  return inet_pton(AF_INET6, host, bin) == 1;
}

static void addr_of(const router_server *s, char *out, size_t size) {
  int v6 = is_ipv6(s->host);
  dc_fmt(out, size, "%s%s%s:%d", v6 ? "[" : "", s->host, v6 ? "]" : "", s->port);
}

/* ---- render -------------------------------------------------------------- */

/* A weight-0 server is written with `down`: nginx refuses weight=0, and
 * `down` takes it out of the rotation as surely as leaving it out would,
 * while the file still names it, so read() reports it at weight 0 as the
 * HAProxy router does, and the next apply knows it was ours. In
 * maintenance every server is `down` behind the maintenance server, its
 * weight kept for read(). */
static void render_server(dc_buf *b, const router_server *s, int maintenance) {
  char addr[96];
  addr_of(s, addr, sizeof addr);
  if (s->weight > 0)
    dc_buf_printf(b, "    server %s weight=%d%s;  # %s\n", addr, s->weight, maintenance ? " down" : "", s->name);
  else
    dc_buf_printf(b, "    server %s down;  # %s\n", addr, s->name);
}

/* The routes, as the comment line carries them (compact JSON, one line). */
static char *routes_json(const route_rules *r, const router_server *s, size_t ns) {
  json_t *o = json_object(), *fresh = json_array();
  for (size_t i = 0; i < ns; i++)
    if (s[i].fresh)
      json_array_append_new(fresh, json_string(s[i].name));
  json_object_set_new(o, "fresh", fresh);
  if (routes_affinity_active(r))
    json_object_set_new(o, "affinity",
                        json_pack("{s:s, s:i, s:s}", "cookie", r->affinity_cookie, "max_age", r->affinity_max_age,
                                  "token", r->affinity_token));
  if (routes_test_active(r))
    json_object_set_new(o, "test",
                        json_pack("{s:s, s:s, s:s}", "header", r->test_header, "cookie", r->test_cookie, "value",
                                  r->test_value));
  if (r->maintenance)
    json_object_set_new(o, "maintenance",
                        json_pack("{s:s, s:i}", "message", r->maintenance_message, "retry_after", r->retry_after));
  char *text = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENSURE_ASCII);
  json_decref(o);
  return text;
}

static void render_maps(dc_buf *b, const ngx_names *nm, const router_server *s, size_t ns, const route_rules *r,
                        int fresh) {
  int sticky = fresh && routes_affinity_active(r) && !r->maintenance;
  int testers = fresh && routes_test_active(r) && !r->maintenance;
  const char *up = nm->upstream;
  char dflt[NGX_NAME_MAX + 32];
  dc_strlcpy(dflt, up, sizeof dflt);
  if (sticky) {
    dc_buf_printf(b, "map $cookie_%s $%s_sticky {\n    default %s;\n    \"%s\" %s" NEW_SUFFIX ";\n}\n",
                  r->affinity_cookie, nm->var, up, r->affinity_token, up);
    dc_fmt(dflt, sizeof dflt, "$%s_sticky", nm->var);
  }
  if (testers) {
    char source[NGX_NAME_MAX + 16];
    if (r->test_header[0]) {
      dc_fmt(source, sizeof source, "$http_%s", r->test_header);
      for (char *c = source; *c; c++)
        *c = *c == '-' ? '_' : (*c >= 'A' && *c <= 'Z') ? (char)(*c - 'A' + 'a') : *c;
    } else {
      dc_fmt(source, sizeof source, "$cookie_%s", r->test_cookie);
    }
    dc_buf_printf(b, "map %s $%s {\n    default %s;\n    \"%s\" %s" NEW_SUFFIX ";\n}\n", source, nm->var, dflt,
                  r->test_value, up);
  } else {
    dc_buf_printf(b, "map $host $%s {\n    default %s;\n}\n", nm->var, dflt);
  }
  dc_buf_printf(b, "map $upstream_addr $%s_cookie {\n    default \"\";\n", nm->var);
  for (size_t i = 0; sticky && i < ns; i++) {
    char addr[96];
    if (!s[i].fresh)
      continue;
    addr_of(&s[i], addr, sizeof addr);
    dc_buf_printf(b, "    \"%s\" \"%s=%s; Max-Age=%d; Path=/; HttpOnly\";\n", addr, r->affinity_cookie,
                  r->affinity_token, r->affinity_max_age);
  }
  dc_buf_puts(b, "}\n");
}

char *nginx_include_render(const ngx_names *nm, const char *gen, const router_server *s, size_t ns,
                           const route_rules *routes, int legacy, size_t *len) {
  static const route_rules none;
  const route_rules *r = routes != NULL ? routes : &none;
  int maint = r->maintenance;
  int fresh = 0;
  for (size_t i = 0; i < ns; i++)
    fresh |= s[i].fresh;
  dc_buf b = {0};
  dc_buf_printf(&b,
                "# deployctl nginx router: upstream %s, generation %s.\n"
                "# Every apply rewrites this file: do not edit it.\n",
                nm->upstream, gen);
  if (routes_any(r)) {
    char *json = routes_json(r, s, ns);
    if (json == NULL)
      b.oom = 1;
    else
      dc_buf_printf(&b, ROUTES_LEAD "%s\n", json);
    free(json);
  }
  dc_buf_printf(&b, "upstream %s {\n", nm->upstream);
  if (maint)
    dc_buf_printf(&b, "    server unix:%s;  # " MAINT_NAME "\n", nm->maint_sock);
  for (size_t i = 0; i < ns; i++)
    render_server(&b, &s[i], maint);
  if (ns == 0 && !maint)
    dc_buf_printf(&b, "    server %s:%d down;  # %s\n", PLACEHOLDER_HOST, PLACEHOLDER_PORT, PLACEHOLDER_NAME);
  dc_buf_puts(&b, "}\n");
  if (fresh && !maint && (routes_affinity_active(r) || routes_test_active(r))) {
    dc_buf_printf(&b, "upstream %s" NEW_SUFFIX " {\n", nm->upstream);
    for (size_t i = 0; i < ns; i++) {
      char addr[96];
      if (!s[i].fresh)
        continue;
      addr_of(&s[i], addr, sizeof addr);
      dc_buf_printf(&b, "    server %s;  # %s (new)\n", addr, s[i].name);
    }
    dc_buf_puts(&b, "}\n");
  }
  if (!legacy)
    render_maps(&b, nm, s, ns, r, fresh);
  dc_buf_printf(&b,
                "server {\n"
                "    listen unix:%s;\n"
                "    access_log off;\n"
                "    location / { return 200 \"%s\"; }\n"
                "}\n",
                nm->sock, gen);
  if (maint) {
    char *page = routes_maintenance_page(r->maintenance_message);
    if (page == NULL)
      b.oom = 1;
    else
      dc_buf_printf(&b,
                    "server {\n"
                    "    listen unix:%s;\n"
                    "    access_log off;\n"
                    "    charset utf-8;\n"
                    "    default_type text/html;\n"
                    "    location / {\n"
                    "        add_header Retry-After %d always;\n"
                    "        return 503 \"%s\";\n"
                    "    }\n"
                    "}\n",
                    nm->maint_sock, r->retry_after, page);
    free(page);
  }
  *len = b.len;
  return dc_buf_take(&b);
}

/* ---- read back ----------------------------------------------------------- */

void nginx_include_generation(const char *text, size_t len, char *gen, size_t size) {
  static const char key[] = ", generation ";
  const char *nl = memchr(text, '\n', len);
  size_t l = nl != NULL ? (size_t)(nl - text) : len;
  char line[256];
  gen[0] = '\0';
  if (l >= sizeof line)
    return;
  memcpy(line, text, l);
  line[l] = '\0';
  char *g = strstr(line, key);
  if (g == NULL)
    return;
  g += sizeof key - 1;
  size_t d = strspn(g, "0123456789");
  if (d > 0 && d < size && d < 21) {
    memcpy(gen, g, d);
    gen[d] = '\0';
  }
}

/* s as a number of 0..max in digits, followed by nothing or by `rest`;
 * else -1. */
static long whole(const char *s, long max, const char *rest) {
  size_t d = strspn(s, "0123456789");
  if (d == 0 || d > 6 || (s[d] != '\0' && (!rest || strcmp(s + d, rest) != 0)))
    return -1;
  long v = strtol(s, NULL, 10);
  return v <= max ? v : -1;
}

/* One "    server HOST:PORT weight=N[ down];  # NAME" line of the weighted
 * upstream; 1 when it is one of ours, 0 for the placeholder, the
 * maintenance server or anything else. */
static int parse_server(const char *line, router_server *s) {
  static const char lead[] = "    server ";
  char buf[256];
  if (strncmp(line, lead, sizeof lead - 1) != 0 || strlen(line) >= sizeof buf)
    return 0;
  dc_strlcpy(buf, line + sizeof lead - 1, sizeof buf);
  char *sp = strchr(buf, ' ');
  char *hash = strstr(buf, ";  # ");
  if (sp == NULL || hash == NULL || hash < sp)
    return 0;
  *sp = '\0';
  *hash = '\0';
  char *name = hash + 5, *what = sp + 1, *colon = strrchr(buf, ':');
  if (colon == NULL || strcmp(name, PLACEHOLDER_NAME) == 0)
    return 0;
  *colon = '\0';
  char *host = buf;
  size_t hl = strlen(host);
  if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
    host[hl - 1] = '\0';
    host++;
  }
  memset(s, 0, sizeof *s);
  dc_strlcpy(s->name, name, sizeof s->name);
  dc_strlcpy(s->host, host, sizeof s->host);
  /* Only what the router writes: a port of 1..65535 and a weight of
   * 0..256 in digits (" down" after it in maintenance); a hand edit such
   * as "-20001" is not a server of ours. */
  long port = whole(colon + 1, 65535, NULL), weight = 0;
  if (port < 1)
    return 0;
  if (strcmp(what, "down") != 0 && (strncmp(what, "weight=", 7) != 0 || (weight = whole(what + 7, 256, " down")) < 0))
    return 0;
  s->port = (int)port;
  s->weight = (int)weight;
  return 1;
}

int nginx_include_servers(const char *text, size_t len, router_server **out, size_t *n) {
  size_t cap = 8;
  router_server *v = malloc(cap * sizeof *v);
  int in_upstream = 0;
  *n = 0;
  *out = NULL;
  if (v == NULL)
    return DC_ERROR;
  for (size_t pos = 0; pos < len;) {
    const char *nl = memchr(text + pos, '\n', len - pos);
    size_t l = nl != NULL ? (size_t)(nl - (text + pos)) : len - pos;
    char line[256];
    if (l < sizeof line) {
      memcpy(line, text + pos, l);
      line[l] = '\0';
      /* the first upstream block is the weighted one */
      if (strncmp(line, "upstream ", 9) == 0)
        in_upstream = in_upstream == 0 ? 1 : 2;
      else if (strcmp(line, "}") == 0 && in_upstream == 1)
        in_upstream = 2;
      if (*n == cap) {
        router_server *p = realloc(v, cap * 2 * sizeof *v);
        if (p == NULL) {
          free(v);
          return DC_ERROR;
        }
        v = p;
        cap *= 2;
      }
      if (in_upstream == 1 && parse_server(line, &v[*n]))
        (*n)++;
    }
    pos += l + 1;
  }
  *out = v;
  return DC_OK;
}

/* The routes of the comment line, and which servers are fresh; 0 when
 * there is no such line, -1 when it is not what render writes. */
static int parse_routes(const char *text, size_t len, route_rules *r, router_server *s, size_t ns) {
  const char *nl = memchr(text, '\n', len);
  nl = nl ? memchr(nl + 1, '\n', len - (size_t)(nl + 1 - text)) : NULL;  /* the third line */
  if (nl == NULL || (size_t)(nl + 1 - text) + sizeof ROUTES_LEAD - 1 > len ||
      strncmp(nl + 1, ROUTES_LEAD, sizeof ROUTES_LEAD - 1) != 0)
    return 0;
  const char *start = nl + 1 + sizeof ROUTES_LEAD - 1;
  const char *end = memchr(start, '\n', len - (size_t)(start - text));
  if (end == NULL)
    return DC_ERROR;
  json_error_t je;
  json_t *o = json_loadb(start, (size_t)(end - start), JSON_REJECT_DUPLICATES, &je);
  if (!json_is_object(o)) {
    json_decref(o);
    return DC_ERROR;
  }
  json_t *v;
  size_t i;
  json_array_foreach(json_object_get(o, "fresh"), i, v) {
    for (size_t k = 0; json_is_string(v) && k < ns; k++)
      if (strcmp(s[k].name, json_string_value(v)) == 0)
        s[k].fresh = 1;
  }
  const char *a = NULL, *b = NULL, *c = NULL;
  int x = 0;
  if ((v = json_object_get(o, "affinity")) != NULL &&
      json_unpack(v, "{s:s, s:i, s:s}", "cookie", &a, "max_age", &x, "token", &b) == 0) {
    dc_strlcpy(r->affinity_cookie, a, sizeof r->affinity_cookie);
    r->affinity_max_age = x;
    dc_strlcpy(r->affinity_token, b, sizeof r->affinity_token);
  }
  if ((v = json_object_get(o, "test")) != NULL &&
      json_unpack(v, "{s:s, s:s, s:s}", "header", &a, "cookie", &b, "value", &c) == 0) {
    dc_strlcpy(r->test_header, a, sizeof r->test_header);
    dc_strlcpy(r->test_cookie, b, sizeof r->test_cookie);
    dc_strlcpy(r->test_value, c, sizeof r->test_value);
  }
  if ((v = json_object_get(o, "maintenance")) != NULL &&
      json_unpack(v, "{s:s, s:i}", "message", &a, "retry_after", &x) == 0) {
    r->maintenance = 1;
    dc_strlcpy(r->maintenance_message, a, sizeof r->maintenance_message);
    r->retry_after = x;
  }
  json_decref(o);
  return 1;
}

/* 1-based number of the first line where a and b differ; that line of a
 * goes into line (shortened). */
static int first_difference(const char *a, size_t alen, const char *b, size_t blen, char *line, size_t size) {
  size_t i = 0, start = 0;
  int no = 1;
  while (i < alen && i < blen && a[i] == b[i]) {
    if (a[i] == '\n') {
      no++;
      start = i + 1;
    }
    i++;
  }
  size_t end = start;
  while (end < alen && a[end] != '\n')
    end++;
  size_t l = end - start < size - 1 ? end - start : size - 1;
  memcpy(line, a + start, l);
  line[l] = '\0';
  for (char *c = line; *c != '\0'; c++)
    if ((unsigned char)*c < 0x20)
      *c = '?';
  return no;
}

static int same_as_render(const ngx_names *nm, const char *gen, const router_server *s, size_t ns,
                          const route_rules *r, int legacy, const char *text, size_t len, char **again,
                          size_t *alen) {
  *again = nginx_include_render(nm, gen, s, ns, r, legacy, alen);
  return *again != NULL && *alen == len && memcmp(*again, text, len) == 0;
}

int nginx_include_parse(const ngx_names *nm, const char *text, size_t len, router_server **out, size_t *nout,
                        route_rules *routes, char *err) {
  char gen[24], line[120];
  size_t rlen = 0;
  char *again = NULL;
  if (text == NULL)
    text = "";
  memset(routes, 0, sizeof *routes);
  nginx_include_generation(text, len, gen, sizeof gen);
  if (nginx_include_servers(text, len, out, nout) < 0) {
    dc_fmt(err, DC_ERR_MAX, "nginx: out of memory");
    return DC_ERROR;
  }
  int has_routes = parse_routes(text, len, routes, *out, *nout);
  if (gen[0] != '\0' && has_routes >= 0) {
    if (same_as_render(nm, gen, *out, *nout, routes, 0, text, len, &again, &rlen)) {
      free(again);
      return DC_OK;
    }
    /* A file of the version before routes: no maps, never routes. */
    char *legacy = NULL;
    size_t llen = 0;
    int ok = !has_routes && same_as_render(nm, gen, *out, *nout, routes, 1, text, len, &legacy, &llen);
    free(legacy);
    if (ok) {
      free(again);
      return DC_OK;
    }
  }
  int no = first_difference(text, len, again != NULL ? again : "", again != NULL ? rlen : 0, line, sizeof line);
  free(again);
  free(*out);
  *out = NULL;
  *nout = 0;
  memset(routes, 0, sizeof *routes);
  dc_fmt(err, DC_ERR_MAX,
         "nginx: %s is not as the router wrote it (line %d: '%s'): the router owns that file; undo the hand "
         "edit, or let the next deployment rewrite it",
         nm->path, no, line);
  return DC_ERROR;
}
