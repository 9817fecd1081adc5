#include "strategy.h"

#include <stdlib.h>
#include <string.h>

#include "util.h"

void strategy_free(strategy *s) {
  if (s && s->free)
    s->free(s);
}

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
