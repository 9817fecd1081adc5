#include "json.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

json_t *dc_json_text(const char *s) {
  if (!s)
    s = "";
  const unsigned char *p = (const unsigned char *)s;
  size_t bad = 0;
  for (size_t i = 0; p[i];) {
    size_t n = dc_utf8_len(p + i);
    bad += n == 0;
    i += n ? n : 1;
  }
  if (bad == 0)
    return json_string(s);
  dc_buf b = {0};
  for (size_t i = 0; p[i];) {
    size_t n = dc_utf8_len(p + i);
    if (n)
      dc_buf_add(&b, s + i, n);
    else
      dc_buf_add(&b, "\xef\xbf\xbd", 3);
    i += n ? n : 1;
  }
  char *clean = dc_buf_take(&b);
  json_t *v = clean ? json_string(clean) : NULL;
  free(clean);
  return v;
}

json_t *dc_json_number(double v) {
  if (v == (double)(json_int_t)v && v > -1e15 && v < 1e15)
    return json_integer((json_int_t)v);
  return json_real(v);
}

/* Redacting after dumping would also hit secrets split by escapes only in
 * theory: a secret is registered as the raw value, and an escaped string
 * differs from it only where it holds quotes, backslashes or controls. So
 * string values are redacted one by one before dumping. */
static json_t *redacted_copy(const json_t *v) {
  if (json_is_string(v)) {
    char *s = strdup(json_string_value(v));
    if (!s)
      return NULL;
    dc_redact(s);
    json_t *r = json_string(s);
    free(s);
    return r;
  }
  if (json_is_object(v)) {
    json_t *o = json_object();
    const char *k;
    json_t *item;
    json_object_foreach((json_t *)v, k, item) {
      json_t *c = redacted_copy(item);
      if (!o || !c || json_object_set_new(o, k, c) != 0) {
        json_decref(o);
        return NULL;
      }
    }
    return o;
  }
  if (json_is_array(v)) {
    json_t *a = json_array();
    size_t i;
    json_t *item;
    json_array_foreach(v, i, item) {
      json_t *c = redacted_copy(item);
      if (!a || !c || json_array_append_new(a, c) != 0) {
        json_decref(a);
        return NULL;
      }
    }
    return a;
  }
  return json_incref((json_t *)v);
}

char *dc_json_dump(const json_t *v) {
  if (!v)
    return NULL;
  json_t *r = dc_secret_count() ? redacted_copy(v) : json_incref((json_t *)v);
  if (!r)
    return NULL;
  /* 17 significant digits: a double survives the trip exactly. */
  char *s = json_dumps(r, JSON_COMPACT | JSON_REAL_PRECISION(17) | JSON_ENCODE_ANY);
  json_decref(r);
  return s;
}

static int check_value(const json_t *v, int depth, char *err, size_t size) {
  if (depth > DC_JSON_MAX_DEPTH) {
    dc_fmt(err, size, "nested deeper than %d levels", DC_JSON_MAX_DEPTH);
    return -1;
  }
  if (json_is_integer(v)) {
    json_int_t i = json_integer_value(v);
    if (i > DC_JSON_SAFE_INTEGER || i < -DC_JSON_SAFE_INTEGER) {
      dc_fmt(err, size, "the integer %lld is beyond 2^53 and would lose precision: write it as a string",
             (long long)i);
      return -1;
    }
    return 0;
  }
  const char *k;
  size_t i;
  json_t *item;
  if (json_is_object(v)) {
    json_object_foreach((json_t *)v, k, item) {
      if (check_value(item, depth + 1, err, size) != 0)
        return -1;
    }
  } else if (json_is_array(v)) {
    json_array_foreach(v, i, item) {
      if (check_value(item, depth + 1, err, size) != 0)
        return -1;
    }
  }
  return 0;
}

json_t *dc_json_parse(const char *text, size_t len, char *err, size_t errsize) {
  json_error_t je;
  /* jansson refuses a NUL inside a string, but its reader takes a NUL after
   * the value for the end of the text: {"version":"g7"}\0{...} would read
   * as g7 (found by fuzz/json.c). So a NUL anywhere is refused here. */
  const char *nul = memchr(text, '\0', len);
  if (nul) {
    int line = 1, column = 1;
    for (const char *p = text; p < nul; p++) {
      column = *p == '\n' ? 1 : column + 1;
      line += *p == '\n';
    }
    dc_fmt(err, errsize, "line %d, column %d: a NUL byte (JSON is text; nothing after it is read)", line, column);
    return NULL;
  }
  json_t *v = json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
  if (!v) {
    dc_fmt(err, errsize, "line %d, column %d: %s", je.line, je.column, je.text);
    return NULL;
  }
  if (check_value(v, 0, err, errsize) != 0) {
    json_decref(v);
    return NULL;
  }
  return v;
}

char *dc_json_string_list(const char *const *items, size_t n) {
  if (n == 0)
    return NULL;
  json_t *a = json_array();
  for (size_t i = 0; a && i < n; i++) {
    json_t *s = dc_json_text(items[i]);
    if (!s || json_array_append_new(a, s) != 0) {
      json_decref(a);
      return NULL;
    }
  }
  char *out = dc_json_dump(a);
  json_decref(a);
  return out;
}
