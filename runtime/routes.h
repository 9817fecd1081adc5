/* How requests reach a target besides the weights of its servers: sticky
 * canaries (session affinity), routes for testers (a header or a cookie
 * that reaches the new version whatever its share) and maintenance (the
 * load balancer answers 503 with a page). A strategy carries the first
 * two, the store the third; a router (router.h) carries them out, each
 * router its own way (README: "Routing beyond weights").
 *
 * Every name and value here ends up in a proxy's configuration (an nginx
 * include, an HAProxy map): what is allowed is checked once, here, so that
 * nothing a user writes can break out of the place it is written to. */
#ifndef DEPLOY_ROUTES_H
#define DEPLOY_ROUTES_H

#include <stddef.h>

#define ROUTES_NAME_MAX 64
#define ROUTES_MESSAGE_MAX 512        /* bytes of a maintenance message */
#define ROUTES_MAX_AGE_DEFAULT 86400  /* a sticky cookie's life, seconds */
#define ROUTES_RETRY_AFTER_DEFAULT 300
#define ROUTES_TEST_VALUE_DEFAULT "always"

typedef struct route_rules {
  /* Sticky canary: a client that reached the new version keeps reaching
   * it until the rollout ends. "" when off. */
  char affinity_cookie[ROUTES_NAME_MAX];
  int affinity_max_age;               /* seconds */
  char affinity_token[48];            /* this rollout's (its deployment id):
                                       * a cookie of another rollout pins
                                       * nobody */
  /* Testers: a request whose header (or cookie) has test_value reaches the
   * new version from the moment its instances are healthy. At most one of
   * test_header and test_cookie is set; "" both when off. */
  char test_header[ROUTES_NAME_MAX];
  char test_cookie[ROUTES_NAME_MAX];
  char test_value[ROUTES_NAME_MAX];
  /* Maintenance: every request is answered 503 with a page and
   * Retry-After, instances left as they are. */
  int maintenance;
  char maintenance_message[ROUTES_MESSAGE_MAX];  /* "" the default text */
  int retry_after;                    /* seconds */
} route_rules;

/* 1 when the rules ask anything of the router beyond weights. */
int routes_any(const route_rules *r);
int routes_test_active(const route_rules *r);
int routes_affinity_active(const route_rules *r);

/* Checks, each -1 with err naming `what` (e.g. "CanaryStrategy
 * session_affinity.cookie") and what is accepted. */
/* A cookie name: 1 to 63 of [A-Za-z0-9_] (nginx reads it as $cookie_NAME). */
int routes_check_cookie(const char *name, const char *what, char *err);
/* A header name: 1 to 63 of [A-Za-z0-9-] (nginx reads it as $http_NAME). */
int routes_check_header(const char *name, const char *what, char *err);
/* A value to match: 1 to 63 of [A-Za-z0-9._~+-], not a key of HAProxy's
 * map of ours ("maintenance", "retry_after"). */
int routes_check_value(const char *value, const char *what, char *err);
int routes_check_max_age(double seconds, const char *what, char *err);
int routes_check_retry_after(double seconds, const char *what, char *err);
/* A maintenance message: valid UTF-8, no control characters, at most
 * ROUTES_MESSAGE_MAX - 1 bytes. */
int routes_check_message(const char *message, const char *what, char *err);

/* The maintenance page, one line of HTML with the message escaped (every
 * character that means something to HTML, nginx or HAProxy's command line
 * written as a character reference). Heap; NULL when out of memory. */
char *routes_maintenance_page(const char *message);

#endif
