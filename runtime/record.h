/* Deployment records: the deployment row, its events and its errors,
 * written in one place for every operation that changes a target
 * (rollouts, reconciles and recoveries, GitOps prunes).
 *
 * Events are JSON objects built with jansson; every string in them is
 * redacted of secrets before it is stored or handed to a sink. A sink sees
 * each event as it is recorded (its store write commits with the loop
 * turn's batch). */
#ifndef DEPLOY_RECORD_H
#define DEPLOY_RECORD_H

#include <stddef.h>

#include "engine.h"
#include "json.h"
#include "store.h"

/* A log payload (d:log) larger than this once encoded is refused: events
 * are rows, not files. Documented in README. */
#define RECORD_EVENT_MAX (64 * 1024)

typedef struct event_sink {
  void (*emit)(void *payload, const store_event *ev);
  void *payload;
} event_sink;

typedef struct record {
  engine *e;
  store *s;
  char id[48];              /* the deployment */
  char target[64];
  event_sink sink;          /* emit NULL: none */
  char **errors;            /* redacted, in the order they happened */
  size_t nerrors, errors_cap;
  int oom;                  /* an error could not be kept */
} record;

/* id NULL: a fresh deployment id. s NULL: events go to the sink only (a
 * reconcile, which leaves no history). */
void record_init(record *rc, engine *e, store *s, const char *target, const char *id, const event_sink *sink);
void record_clear(record *rc);

/* Stores an event and hands it to the sink; takes data (may be NULL). An
 * event that cannot be stored is reported on stderr but does not stop what
 * is under way: the deployment row and the router remain the truth. */
void record_event(record *rc, const char *kind, json_t *data);
/* The same with a JSON text payload (d:log); -1 with err when it is not a
 * JSON object or is larger than RECORD_EVENT_MAX. */
int record_event_text(record *rc, const char *kind, const char *json_text, char *err);

/* Keeps an error for the result (redacted). */
void record_error(record *rc, const char *msg);
void record_errorf(record *rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The errors as a JSON array (NULL when none); caller frees. */
char *record_errors_json(const record *rc);

/* A deployment row owned by this process: id, target, version, kind,
 * strategy, created_at and metadata as given, owner and user from the
 * process. Strings are copied; metadata is borrowed (not freed by the
 * row's owner: clear it before store_deployment_clear). */
void record_row(const record *rc, store_deployment *d, const char *version, const char *kind, const char *strategy,
                double created_at, const char *metadata_json);

#endif
