#include "record.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util.h"

void record_init(record *rc, engine *e, store *s, const char *target, const char *id, const event_sink *sink) {
  memset(rc, 0, sizeof *rc);
  rc->e = e;
  rc->s = s;
  dc_strlcpy(rc->target, target, sizeof rc->target);
  if (id && *id)
    dc_strlcpy(rc->id, id, sizeof rc->id);
  else
    dc_new_id(rc->id, sizeof rc->id);
  if (sink)
    rc->sink = *sink;
}

void record_clear(record *rc) {
  for (size_t i = 0; i < rc->nerrors; i++)
    free(rc->errors[i]);
  free(rc->errors);
  rc->errors = NULL;
  rc->nerrors = rc->errors_cap = 0;
}

/* An event the store could not keep does not stop the rollout (the step
 * itself is recorded apart, and waited for): it is said on stderr, once
 * for a run of the same failure, not once per event. */
static void event_stored(void *payload, const store_result *r) {
  static char last[DC_ERR_MAX];
  (void)payload;
  if (r->rc == DC_OK) {
    last[0] = '\0';
  } else if (strcmp(last, r->err) != 0) {
    dc_strlcpy(last, r->err, sizeof last);
    fprintf(stderr, "deployctl: an event was not stored: %s\n", r->err);
  }
}

static void store_and_emit(record *rc, const char *kind, char *text) {
  char err[DC_ERR_MAX];
  store_event ev;
  memset(&ev, 0, sizeof ev);
  dc_strlcpy(ev.deployment_id, rc->id, sizeof ev.deployment_id);
  dc_strlcpy(ev.target, rc->target, sizeof ev.target);
  dc_strlcpy(ev.kind, kind, sizeof ev.kind);
  ev.ts = engine_now(rc->e);
  ev.data = text;
  if (rc->s && store_event_add(rc->s, &ev, event_stored, NULL, err) != 0)
    fprintf(stderr, "%s\n", err);
  if (rc->sink.emit)
    rc->sink.emit(rc->sink.payload, &ev);
}

void record_event(record *rc, const char *kind, json_t *data) {
  char *text = data ? dc_json_dump(data) : NULL;
  json_decref(data);
  store_and_emit(rc, kind, text);
  free(text);
}

int record_event_text(record *rc, const char *kind, const char *json_text, char *err) {
  size_t len = strlen(json_text);
  if (len > RECORD_EVENT_MAX) {
    dc_fmt(err, DC_ERR_MAX, "deploy: d:log(event): the event is %zu bytes once encoded as JSON: at most %d are "
           "stored (log less, or write it to a file and log its path)", len, RECORD_EVENT_MAX);
    return -1;
  }
  char why[DC_ERR_MAX];
  json_t *v = dc_json_parse(json_text, len, why, sizeof why);
  if (!v || !json_is_object(v)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: d:log(event): not a JSON object: %s", v ? "give a table" : why);
    json_decref(v);
    return -1;
  }
  record_event(rc, kind, v);
  return 0;
}

void record_error(record *rc, const char *msg) {
  if (rc->nerrors == rc->errors_cap) {
    size_t cap = rc->errors_cap ? rc->errors_cap * 2 : 4;
    char **g = realloc(rc->errors, cap * sizeof *g);
    if (!g) {
      rc->oom = 1;
      return;
    }
    rc->errors = g;
    rc->errors_cap = cap;
  }
  char *copy = strdup(msg ? msg : "failed");
  if (!copy) {
    rc->oom = 1;
    return;
  }
  dc_redact(copy);
  rc->errors[rc->nerrors++] = copy;
}

void record_errorf(record *rc, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  char *s = n >= 0 ? malloc((size_t)n + 1) : NULL;
  if (!s) {
    rc->oom = 1;
    return;
  }
  va_start(ap, fmt);
  vsnprintf(s, (size_t)n + 1, fmt, ap);
  va_end(ap);
  record_error(rc, s);
  free(s);
}

char *record_errors_json(const record *rc) {
  return dc_json_string_list((const char *const *)rc->errors, rc->nerrors);
}

void record_row(const record *rc, store_deployment *d, const char *version, const char *kind, const char *strategy,
                double created_at, const char *metadata_json) {
  memset(d, 0, sizeof *d);
  dc_strlcpy(d->id, rc->id, sizeof d->id);
  dc_strlcpy(d->target, rc->target, sizeof d->target);
  dc_strlcpy(d->version, version ? version : "", sizeof d->version);
  dc_strlcpy(d->kind, kind ? kind : "deploy", sizeof d->kind);
  dc_strlcpy(d->strategy, strategy ? strategy : "", sizeof d->strategy);
  dc_strlcpy(d->status, "running", sizeof d->status);
  d->created_at = created_at;
  d->metadata = (char *)metadata_json;
  d->owner_pid = (int)getpid();
  d->owner_start = dc_proc_start_time(d->owner_pid);
  if (gethostname(d->owner_host, sizeof d->owner_host - 1) != 0)
    d->owner_host[0] = '\0';
  dc_whoami(d->user, sizeof d->user);
}
