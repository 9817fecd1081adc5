#include "strategy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

int strategy_check_url(const char *url, const char *param, char *err) {
  if (!url || !*url)
    return 0;
  const char *pairs[] = {"host", "127.0.0.1", "port", "8080", NULL};
  char filled[600];
  if (strlen(url) > 500 || dc_expand_placeholders(filled, sizeof filled, url, pairs) != 0) {
    dc_fmt(err, DC_ERR_MAX, "deploy: %s is longer than 500 bytes", param);
    return -1;
  }
  const char *rest = NULL;
  if (strncmp(filled, "http://", 7) == 0)
    rest = filled + 7;
  else if (strncmp(filled, "https://", 8) == 0)
    rest = filled + 8;
  if (!rest || !*rest || *rest == '/' || *rest == ':' || strpbrk(filled, " \t\r\n\"<>\\^`{|}")) {
    dc_fmt(err, DC_ERR_MAX,
           "deploy: %s '%.200s' is not a URL: write http://{host}:{port}/healthz or an absolute http(s) URL",
           param, url);
    return -1;
  }
  return 0;
}

int strategy_check_routes(const route_rules *r, const char *cls, int affinity_ok, char *err) {
  char what[96];
  if (r->affinity_cookie[0]) {
    if (!affinity_ok) {
      dc_fmt(err, DC_ERR_MAX, "deploy: %s has no session_affinity: a switch moves everyone at once (use "
             "CanaryStrategy for sticky canaries)", cls);
      return -1;
    }
    dc_fmt(what, sizeof what, "%s session_affinity.cookie", cls);
    if (routes_check_cookie(r->affinity_cookie, what, err) != 0)
      return -1;
    dc_fmt(what, sizeof what, "%s session_affinity.max_age", cls);
    if (routes_check_max_age(r->affinity_max_age, what, err) != 0)
      return -1;
  }
  int header = r->test_header[0] != '\0', cookie = r->test_cookie[0] != '\0';
  if (!header && !cookie && !r->test_value[0])
    return 0;
  if (header == cookie) {
    dc_fmt(err, DC_ERR_MAX,
           "deploy: %s test_route must name a header or a cookie (one of them), e.g. { header = \"X-Canary\", value = "
           "\"always\" }",
           cls);
    return -1;
  }
  dc_fmt(what, sizeof what, "%s test_route.%s", cls, header ? "header" : "cookie");
  if ((header ? routes_check_header(r->test_header, what, err) : routes_check_cookie(r->test_cookie, what, err)) != 0)
    return -1;
  dc_fmt(what, sizeof what, "%s test_route.value", cls);
  return routes_check_value(r->test_value, what, err) != 0 ? -1 : 0;
}

const char *const canary_param_names[] = {"initial_percentage", "increment", "interval", "health_check_url",
                                          "pause_at", "session_affinity", "test_route", "analysis", NULL};
const char *const bluegreen_param_names[] = {"switch_delay", "scale_down_delay", "health_check_url", "test_route",
                                             "analysis", NULL};

static int known(const char *const *names, const char *key) {
  for (; *names; names++)
    if (strcmp(*names, key) == 0)
      return 1;
  return 0;
}

static void list(const char *const *names, char *buf, size_t size) {
  size_t len = 0;
  buf[0] = '\0';
  for (; *names && len < size; names++)
    len += (size_t)snprintf(buf + len, size - len, "%s%s", len ? ", " : "", *names);
}

static int number(const json_t *obj, const char *cls, const char *key, double *v, char *err) {
  json_t *x = json_object_get(obj, key);
  if (!x)
    return 0;
  if (!json_is_number(x)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: %s %s must be a number, got %s", cls, key,
           json_is_string(x) ? "string" : json_is_boolean(x) ? "boolean" : json_is_null(x) ? "null" : "a table");
    return -1;
  }
  *v = json_number_value(x);
  return 0;
}

static int url(const json_t *obj, const char *cls, const char **out, char *err) {
  json_t *x = json_object_get(obj, "health_check_url");
  if (!x)
    return 0;
  if (!json_is_string(x)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: %s health_check_url must be a string", cls);
    return -1;
  }
  *out = json_string_value(x);
  return 0;
}

static int pauses(const json_t *obj, canary_params *p, char *err) {
  json_t *x = json_object_get(obj, "pause_at");
  if (!x)
    return 0;
  if (json_is_number(x)) {
    p->pause_at[p->npause++] = json_number_value(x);
    return 0;
  }
  if (!json_is_array(x)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: CanaryStrategy pause_at must be a list of percentages such as [50]");
    return -1;
  }
  if (json_array_size(x) > CANARY_MAX_PAUSES) {
    dc_fmt(err, DC_ERR_MAX, "deploy: CanaryStrategy pause_at has %zu entries: at most %d", json_array_size(x),
           CANARY_MAX_PAUSES);
    return -1;
  }
  size_t i;
  json_t *v;
  json_array_foreach(x, i, v) {
    if (!json_is_number(v)) {
      dc_fmt(err, DC_ERR_MAX, "deploy: CanaryStrategy pause_at[%zu] must be a number", i + 1);
      return -1;
    }
    p->pause_at[p->npause++] = json_number_value(v);
  }
  return 0;
}

static const char *json_kind(const json_t *x) {
  return json_is_string(x)    ? "a string"
         : json_is_number(x)  ? "a number"
         : json_is_boolean(x) ? "a boolean"
         : json_is_null(x)    ? "null"
         : json_is_array(x)   ? "a list"
                              : "an object";
}

/* A string field of a routes object into buf ("" when absent). */
static int route_string(const json_t *o, const char *cls, const char *obj, const char *key, char *buf, size_t size,
                        char *err) {
  json_t *x = json_object_get(o, key);
  buf[0] = '\0';
  if (!x)
    return 0;
  if (!json_is_string(x)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: %s %s.%s must be a string, got %s", cls, obj, key, json_kind(x));
    return -1;
  }
  if (strlen(json_string_value(x)) >= size) {
    dc_fmt(err, DC_ERR_MAX, "deploy: %s %s.%s is longer than %zu bytes", cls, obj, key, size - 1);
    return -1;
  }
  dc_strlcpy(buf, json_string_value(x), size);
  return 0;
}

static int route_object(const json_t *obj, const char *cls, const char *key, const char *const *keys,
                        const json_t **out, char *err) {
  json_t *x = json_object_get(obj, key);
  *out = NULL;
  if (!x)
    return 0;
  if (!json_is_object(x)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: %s %s must be an object such as %s, got %s", cls, key,
           strcmp(key, "test_route") == 0 ? "{\"header\": \"X-Canary\", \"value\": \"always\"}"
                                          : "{\"cookie\": \"canary\", \"max_age\": 3600}",
           json_kind(x));
    return -1;
  }
  const char *k;
  json_t *v;
  json_object_foreach(x, k, v) {
    if (!known(keys, k)) {
      char all[128];
      list(keys, all, sizeof all);
      dc_fmt(err, DC_ERR_MAX, "deploy: %s %s has no field '%s' (known: %s)", cls, key, k, all);
      return -1;
    }
  }
  *out = x;
  return 0;
}

/* session_affinity and test_route of a manifest's strategy object. */
static int routes_from_json(const json_t *obj, const char *cls, route_rules *r, char *err) {
  static const char *const affinity_keys[] = {"cookie", "max_age", NULL};
  static const char *const test_keys[] = {"header", "cookie", "value", NULL};
  const json_t *a, *t;
  if (route_object(obj, cls, "session_affinity", affinity_keys, &a, err) ||
      route_object(obj, cls, "test_route", test_keys, &t, err))
    return -1;
  if (a) {
    double age = ROUTES_MAX_AGE_DEFAULT;
    if (route_string(a, cls, "session_affinity", "cookie", r->affinity_cookie, sizeof r->affinity_cookie, err))
      return -1;
    json_t *m = json_object_get(a, "max_age");
    if (m && !json_is_number(m)) {
      dc_fmt(err, DC_ERR_MAX, "deploy: %s session_affinity.max_age must be a number, got %s", cls, json_kind(m));
      return -1;
    }
    if (m)
      age = json_number_value(m);
    if (!r->affinity_cookie[0]) {
      dc_fmt(err, DC_ERR_MAX, "deploy: %s session_affinity needs a cookie name, e.g. {\"cookie\": \"canary\"}", cls);
      return -1;
    }
    char what[96];
    dc_fmt(what, sizeof what, "%s session_affinity.max_age", cls);
    if (routes_check_max_age(age, what, err) != 0)
      return -1;
    r->affinity_max_age = (int)age;
  }
  if (t) {
    if (route_string(t, cls, "test_route", "header", r->test_header, sizeof r->test_header, err) ||
        route_string(t, cls, "test_route", "cookie", r->test_cookie, sizeof r->test_cookie, err) ||
        route_string(t, cls, "test_route", "value", r->test_value, sizeof r->test_value, err))
      return -1;
    if (!json_object_get(t, "value"))
      dc_strlcpy(r->test_value, ROUTES_TEST_VALUE_DEFAULT, sizeof r->test_value);
  }
  return 0;
}

int strategy_from_json(const json_t *obj, strategy **out, char *err) {
  *out = NULL;
  const char *kind = json_string_value(json_object_get(obj, "kind"));
  int canary = kind && strcmp(kind, "canary") == 0;
  if (!kind || (!canary && strcmp(kind, "blue-green") != 0))
    return 0;
  const char *cls = canary ? "CanaryStrategy" : "BlueGreenStrategy";
  const char *const *names = canary ? canary_param_names : bluegreen_param_names;
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)obj, key, v) {
    if (strcmp(key, "kind") != 0 && !known(names, key)) {
      char all[256];
      list(names, all, sizeof all);
      dc_fmt(err, DC_ERR_MAX, "deploy: %s has no parameter '%s' (known: %s)", cls, key, all);
      return -1;
    }
  }
  if (canary) {
    canary_params p;
    canary_params_default(&p);
    if (number(obj, cls, "initial_percentage", &p.initial_percentage, err) || number(obj, cls, "increment", &p.increment, err) ||
        number(obj, cls, "interval", &p.interval, err) || url(obj, cls, &p.health_check_url, err) || pauses(obj, &p, err) ||
        routes_from_json(obj, cls, &p.routes, err))
      return -1;
    p.analysis = json_object_get(obj, "analysis");
    return strategy_canary_new(out, &p, err) == 0 ? 1 : -1;
  }
  bluegreen_params p;
  bluegreen_params_default(&p);
  if (number(obj, cls, "switch_delay", &p.switch_delay, err) ||
      number(obj, cls, "scale_down_delay", &p.scale_down_delay, err) || url(obj, cls, &p.health_check_url, err) ||
      routes_from_json(obj, cls, &p.routes, err))
    return -1;
  p.analysis = json_object_get(obj, "analysis");
  return strategy_bluegreen_new(out, &p, err) == 0 ? 1 : -1;
}
