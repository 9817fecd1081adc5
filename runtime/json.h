/* JSON in the runtime, on jansson (Debian's libjansson-dev): chosen over
 * json-c because its decoder refuses what manifests must not carry without
 * extra code (duplicate keys with JSON_REJECT_DUPLICATES, NUL bytes in
 * strings, invalid UTF-8, bytes after the value), keeps 64-bit integers
 * exact, keeps object keys in insertion order, and builds values with
 * json_pack's format strings. Every event, error list and metadata object
 * the runtime writes goes through here; nothing is printf-built. */
#ifndef DEPLOY_JSON_H
#define DEPLOY_JSON_H

#include <stddef.h>

#include <jansson.h>

/* Largest integer that survives a round trip through a double (Lua's
 * cjson, JavaScript): manifests refuse integers beyond it. */
#define DC_JSON_SAFE_INTEGER 9007199254740991LL
/* Nesting refused beyond this depth in anything parsed. */
#define DC_JSON_MAX_DEPTH 64

/* A JSON string of arbitrary bytes: invalid UTF-8 sequences become U+FFFD
 * (jansson refuses them), so an error quoting a peer's answer never makes
 * an event unreadable. NULL only when out of memory; NULL s gives "". */
json_t *dc_json_text(const char *s);

/* A number as JSON: an integer when it is one (10, not 10.0), so that
 * whoever reads it back (Lua, cjson) sees what was meant. */
json_t *dc_json_number(double v);

/* Compact text of v, with every string redacted of secrets (dc_redact).
 * NULL v gives NULL; NULL also when out of memory. Caller frees. */
char *dc_json_dump(const json_t *v);

/* Strict parse of len bytes: one value and nothing after it, no NUL byte,
 * valid UTF-8, no duplicate object key, at most DC_JSON_MAX_DEPTH deep,
 * integers within DC_JSON_SAFE_INTEGER. NULL with err filled ("line 3,
 * column 7: duplicate object key 'version'"). */
json_t *dc_json_parse(const char *text, size_t len, char *err, size_t errsize);

/* ["a","b"] from a list of messages (each redacted); NULL when n == 0. */
char *dc_json_string_list(const char *const *items, size_t n);

#endif
