/* The JSON reader (runtime/json.c) on any bytes: dc_json_parse as the
 * manifest and store readers call it (the byte count, not strlen), then
 * what its callers rely on: a value it accepts dumps to text that parses
 * back to the same value (metadata goes store -> Lua -> store), and
 * dc_json_text turns any C string into text that parses back. */
#include "fuzz.h"

#include <jansson.h>

#include "json.h"
#include "util.h"

/* Every string in v is valid UTF-8 without NUL, every integer is safe and
 * the depth is bounded: what dc_json_parse promises to its callers. */
static void check_promises(const json_t *v, int depth) {
  FUZZ_CHECK(depth <= DC_JSON_MAX_DEPTH);
  const char *k;
  size_t i;
  json_t *item;
  switch (json_typeof(v)) {
  case JSON_OBJECT:
    json_object_foreach((json_t *)v, k, item) check_promises(item, depth + 1);
    break;
  case JSON_ARRAY:
    json_array_foreach(v, i, item) check_promises(item, depth + 1);
    break;
  case JSON_STRING:
    FUZZ_CHECK(strlen(json_string_value(v)) == json_string_length(v));
    break;
  case JSON_INTEGER:
    FUZZ_CHECK(json_integer_value(v) <= DC_JSON_SAFE_INTEGER && json_integer_value(v) >= -DC_JSON_SAFE_INTEGER);
    break;
  default:
    break;
  }
}

static void round_trip(const json_t *v) {
  char err[DC_ERR_MAX];
  char *text = dc_json_dump(v);
  FUZZ_CHECK(text != NULL);
  json_t *back = dc_json_parse(text, strlen(text), err, sizeof err);
  if (!back)
    fprintf(stderr, "fuzz: dumped %s, which does not parse back: %s\n", text, err);
  FUZZ_CHECK(back != NULL);
  FUZZ_CHECK(json_equal((json_t *)v, back));
  json_decref(back);
  free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char err[DC_ERR_MAX] = "";
  json_t *v = dc_json_parse((const char *)data, size, err, sizeof err);
  if (v) {
    FUZZ_CHECK(memchr(data, 0, size) == NULL);
    check_promises(v, 0);
    round_trip(v);
    json_decref(v);
  } else {
    FUZZ_CHECK(err[0] != '\0');
  }

  /* dc_json_text: any C string (a peer's answer quoted in an error). */
  char *s = fuzz_cstr(data, size);
  json_t *t = dc_json_text(s);
  FUZZ_CHECK(t != NULL && json_is_string(t));
  round_trip(t);
  json_decref(t);

  /* dc_json_string_list: the lines as a list of messages (the errors of a
   * deployment, as stored). */
  const char *lines[16];
  size_t n = 0;
  for (char *p = s; n < 16;) {
    lines[n++] = p;
    char *nl = strchr(p, '\n');
    if (!nl)
      break;
    *nl = '\0';
    p = nl + 1;
  }
  char *list = dc_json_string_list(lines, n);
  FUZZ_CHECK(list != NULL);
  json_t *back = dc_json_parse(list, strlen(list), err, sizeof err);
  FUZZ_CHECK(back != NULL && json_is_array(back) && json_array_size(back) == n);
  json_decref(back);
  free(list);
  free(s);
  return 0;
}
