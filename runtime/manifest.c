#include "manifest.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "util.h"
#include "webhook.h"

static const char *const known_fields[] = {"target", "version", "strategy", "metadata", NULL};

static void add_error(manifest *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add_error(manifest *m, const char *fmt, ...) {
  char msg[DC_ERR_MAX];
  va_list ap;
  va_start(ap, fmt);
  dc_vfmt(msg, sizeof msg, fmt, ap);
  va_end(ap);
  char **g = realloc(m->errors, (m->nerrors + 1) * sizeof *g);
  if (!g)
    return;
  m->errors = g;
  dc_buf b = {0};
  char *name = dc_printable(m->file ? m->file : "?");
  dc_buf_printf(&b, "%s: %s", name ? name : "?", msg);
  free(name);
  m->errors[m->nerrors] = dc_buf_take(&b);
  if (m->errors[m->nerrors])
    m->nerrors++;
}

static const char *type_name(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT:
    return "an object";
  case JSON_ARRAY:
    return "an array";
  case JSON_STRING:
    return "string";
  case JSON_INTEGER:
  case JSON_REAL:
    return "number";
  case JSON_TRUE:
  case JSON_FALSE:
    return "boolean";
  default:
    return "null";
  }
}

static const char *problem_text(gitops_problem p) {
  switch (p) {
  case GITOPS_SYMLINK:
    return "is a symbolic link: refused (a link could point outside path; commit the manifest itself)";
  case GITOPS_TOO_LARGE:
    return "is larger than 1 MiB: refused unread (split it, or trim its metadata)";
  case GITOPS_NOT_FILE:
    return "is not a regular file (a submodule?): refused";
  case GITOPS_BAD_NAME:
    return "has a name that leaves path ('/' or '..' in a tree entry): refused";
  default:
    return "cannot be read";
  }
}

/* A string field; NULL (with an error) when missing or of another type. */
static const char *string_field(manifest *m, const json_t *obj, const char *key, const char *field,
                                const char *example) {
  json_t *v = json_object_get(obj, key);
  if (!v) {
    add_error(m, "field '%s' is missing: add it, e.g. %s", field, example);
    return NULL;
  }
  if (!json_is_string(v)) {
    add_error(m, "field '%s' must be a string, got %s", field, type_name(v));
    return NULL;
  }
  return json_string_value(v);
}

static void check_target(manifest *m, const json_t *obj, const manifest_checks *c) {
  char err[DC_ERR_MAX];
  const char *target = string_field(m, obj, "target", "target", "\"target\": \"production\"");
  if (!target)
    return;
  if (c->target && c->target(c->payload, target, err) != 0) {
    add_error(m, "field 'target': %s", err);
    return;
  }
  dc_strlcpy(m->target, target, sizeof m->target);
}

static void check_version(manifest *m, const json_t *obj) {
  char err[DC_ERR_MAX];
  const char *version = string_field(m, obj, "version", "version", "\"version\": \"1.4.2\"");
  if (!version)
    return;
  if (dc_validate_version(version, "field 'version'", err) != 0) {
    add_error(m, "%s", dc_unprefix(err));
    return;
  }
  dc_strlcpy(m->version, version, sizeof m->version);
}

static void check_strategy(manifest *m, const json_t *obj, const manifest_checks *c) {
  char err[DC_ERR_MAX];
  json_t *st = json_object_get(obj, "strategy");
  if (!st)
    return; /* the manager's default */
  if (!json_is_object(st)) {
    add_error(m, "field 'strategy' must be an object such as {\"kind\": \"canary\"}, got %s", type_name(st));
    return;
  }
  if (!string_field(m, st, "kind", "strategy.kind", "\"kind\": \"canary\""))
    return;
  /* The webhooks are the runtime's to check (webhook.c, as from git: no
   * secret in clear, no environment variable in a URL); the rest of the
   * object is the strategy's. */
  json_t *hooks = json_object_get(st, "webhooks");
  json_t *rest = hooks ? json_copy(st) : json_incref(st);
  if (hooks) {
    webhook_list l;
    char field[64];
    if (webhook_list_from_json(&l, hooks, WEBHOOK_FROM_GIT, field, sizeof field, err) != 0) {
      add_error(m, "field 'strategy.%s': %s", field, err);
      json_decref(rest);
      return;
    }
    webhook_list_clear(&l);
    json_object_del(rest, "webhooks");
  }
  int bad = c->strategy && c->strategy(c->payload, rest, err) != 0;
  json_decref(rest);
  if (bad) {
    add_error(m, "%s", dc_unprefix(err));
    return;
  }
  m->strategy = json_incref(st);
}

static void check_metadata(manifest *m, const json_t *obj) {
  json_t *meta = json_object_get(obj, "metadata");
  if (!meta)
    return;
  if (!json_is_object(meta)) {
    add_error(m, "field 'metadata' must be an object, got %s", type_name(meta));
    return;
  }
  if (json_object_get(meta, "gitops")) {
    add_error(m, "field 'metadata.gitops' is reserved: deployctl records the revision there; use another name");
    return;
  }
  char *text = dc_json_dump(meta);
  size_t len = text ? strlen(text) : 0;
  free(text);
  if (len > MANIFEST_METADATA_MAX) {
    add_error(m, "field 'metadata' is larger than 64 KiB once encoded: keep it small");
    return;
  }
  m->metadata = json_incref(meta);
}

int manifest_read(manifest *m, const gitops_entry *en, const manifest_checks *c) {
  char err[DC_ERR_MAX];
  memset(m, 0, sizeof *m);
  m->file = strdup(en->file ? en->file : "");
  if (!m->file)
    return -1;
  dc_strlcpy(m->oid, en->oid, sizeof m->oid);
  if (en->problem != GITOPS_OK || !en->data) {
    add_error(m, "%s", problem_text(en->problem));
    return 0;
  }
  /* The blob's size, not strlen: a NUL inside the file is refused, never a
   * place where reading silently stops. */
  json_t *obj = dc_json_parse(en->data, en->size, err, sizeof err);
  if (!obj) {
    add_error(m, "not valid JSON: %s: fix the syntax", err);
    return 0;
  }
  if (!json_is_object(obj)) {
    add_error(m, "must be a JSON object {\"target\": ..., \"version\": ...}");
    json_decref(obj);
    return 0;
  }
  const char *key;
  json_t *v;
  json_object_foreach(obj, key, v) {
    int known = 0;
    for (const char *const *k = known_fields; *k; k++)
      known |= strcmp(*k, key) == 0;
    if (!known)
      add_error(m, "unknown field '%s' (known: target, version, strategy, metadata): remove it", key);
  }
  check_target(m, obj, c);
  check_version(m, obj);
  check_strategy(m, obj, c);
  check_metadata(m, obj);
  json_decref(obj);
  return 0;
}

void manifest_clear(manifest *m) {
  if (!m)
    return;
  free(m->file);
  json_decref(m->strategy);
  json_decref(m->metadata);
  for (size_t i = 0; i < m->nerrors; i++)
    free(m->errors[i]);
  free(m->errors);
  memset(m, 0, sizeof *m);
}
