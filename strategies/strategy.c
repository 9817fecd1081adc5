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

const char *const canary_param_names[] = {"initial_percentage", "increment", "interval", "health_check_url",
                                          "pause_at", "analysis", NULL};
const char *const bluegreen_param_names[] = {"switch_delay", "scale_down_delay", "health_check_url", "analysis",
                                             NULL};

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
        number(obj, cls, "interval", &p.interval, err) || url(obj, cls, &p.health_check_url, err) || pauses(obj, &p, err))
      return -1;
    p.analysis = json_object_get(obj, "analysis");
    return strategy_canary_new(out, &p, err) == 0 ? 1 : -1;
  }
  bluegreen_params p;
  bluegreen_params_default(&p);
  if (number(obj, cls, "switch_delay", &p.switch_delay, err) ||
      number(obj, cls, "scale_down_delay", &p.scale_down_delay, err) || url(obj, cls, &p.health_check_url, err))
    return -1;
  p.analysis = json_object_get(obj, "analysis");
  return strategy_bluegreen_new(out, &p, err) == 0 ? 1 : -1;
}
