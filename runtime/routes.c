#include "routes.h"

#include <string.h>

#include "util.h"

int routes_affinity_active(const route_rules *r) { return r != NULL && r->affinity_cookie[0] != '\0'; }

int routes_test_active(const route_rules *r) {
  return r != NULL && (r->test_header[0] != '\0' || r->test_cookie[0] != '\0') && r->test_value[0] != '\0';
}

int routes_any(const route_rules *r) {
  return routes_affinity_active(r) || routes_test_active(r) || (r != NULL && r->maintenance);
}

static int only(const char *s, const char *extra) {
  for (; *s; s++) {
    char c = *s;
    int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || strchr(extra, c) != NULL;
    if (!ok)
      return 0;
  }
  return 1;
}

static int check_token(const char *s, const char *extra, const char *what, const char *accepted, char *err) {
  if (!s || !*s || strlen(s) >= ROUTES_NAME_MAX || !only(s, extra)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: %s '%.80s' is not valid: %s", what, s ? s : "", accepted);
    return DC_ERROR;
  }
  return DC_OK;
}

int routes_check_cookie(const char *name, const char *what, char *err) {
  return check_token(name, "_", what, "1 to 63 letters, digits or '_' (nginx reads it as $cookie_NAME)", err);
}

int routes_check_header(const char *name, const char *what, char *err) {
  return check_token(name, "-", what, "1 to 63 letters, digits or '-', e.g. X-Canary", err);
}

int routes_check_value(const char *value, const char *what, char *err) {
  if (check_token(value, "._~+-", what, "1 to 63 letters, digits or . _ ~ + -, e.g. always", err) != DC_OK)
    return DC_ERROR;
  if (strcmp(value, "maintenance") == 0 || strcmp(value, "retry_after") == 0) {
    dc_fmt(err, DC_ERR_MAX, "deploy: %s '%s' is a key deployctl keeps in HAProxy's map: choose another value",
           what, value);
    return DC_ERROR;
  }
  return DC_OK;
}

int routes_check_max_age(double seconds, const char *what, char *err) {
  if (!(seconds >= 1 && seconds <= 31536000) || seconds != (double)(long)seconds) {
    dc_fmt(err, DC_ERR_MAX, "deploy: %s must be a whole number of seconds from 1 to 31536000 (a year), got %g", what,
           seconds);
    return DC_ERROR;
  }
  return DC_OK;
}

int routes_check_retry_after(double seconds, const char *what, char *err) {
  if (!(seconds >= 0 && seconds <= 604800) || seconds != (double)(long)seconds) {
    dc_fmt(err, DC_ERR_MAX, "deploy: %s must be a whole number of seconds from 0 to 604800 (a week), got %g", what,
           seconds);
    return DC_ERROR;
  }
  return DC_OK;
}

int routes_check_message(const char *message, const char *what, char *err) {
  size_t n = strlen(message);
  if (n >= ROUTES_MESSAGE_MAX) {
    dc_fmt(err, DC_ERR_MAX, "deploy: %s is %zu bytes long: at most %d", what, n, ROUTES_MESSAGE_MAX - 1);
    return DC_ERROR;
  }
  for (const unsigned char *p = (const unsigned char *)message; *p;) {
    size_t l = dc_utf8_len(p);
    if (l == 0 || *p < 0x20 || *p == 0x7f) {
      dc_fmt(err, DC_ERR_MAX,
             "deploy: %s holds a control character or bytes that are not UTF-8 at byte %zu: one line of text "
             "is accepted",
             what, (size_t)(p - (const unsigned char *)message) + 1);
      return DC_ERROR;
    }
    p += l;
  }
  return DC_OK;
}

char *routes_maintenance_page(const char *message) {
  static const char *const dflt = "This service is down for maintenance and will be back shortly.";
  dc_buf b = {0};
  dc_buf_puts(&b, "<!doctype html><html><head><meta charset=utf-8><title>Down for maintenance</title></head>"
                  "<body><h1>Down for maintenance</h1><p>");
  for (const char *p = message && *message ? message : dflt; *p; p++) {
    /* Characters that mean something to HTML, to an nginx string ($ and
     * \) or to HAProxy's command line (;) never appear as they are. */
    if (strchr("&<>\"'$\\;%{}", *p))
      dc_buf_printf(&b, "&#%d;", (unsigned char)*p);
    else
      dc_buf_add(&b, p, 1);
  }
  dc_buf_puts(&b, "</p></body></html>");
  return dc_buf_take(&b);
}
