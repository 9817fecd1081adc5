/* The nginx router's readers (runtime/nginx.c, through its DEPLOY_FUZZ
 * entry points): the include file it owns, as read() and apply read it
 * back (a hand edit makes it outside input), and nginx -T's stderr,
 * summed up in one line for errors. Each input is given to both: the
 * include as the bytes of a file (NULs and all), the stderr as the C
 * string it is read into. */
#include "fuzz.h"

#include "router.h"
#include "util.h"

#define UPSTREAM "app"
#define SOCK "/etc/nginx/deployctl/app.gen.sock"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  router_server *servers = NULL;
  size_t n = 0;
  char err[DC_ERR_MAX] = "";
  /* As read_include hands it over: the bytes, NUL-terminated. */
  char *text = fuzz_cstr(data, size);
  int rc = nginx_fuzz_include(UPSTREAM, SOCK, text, size, &servers, &n, err);
  if (rc == 0) {
    /* Exactly what the router writes: what it reads back is what it wrote. */
    for (size_t i = 0; i < n; i++)
      FUZZ_CHECK(servers[i].weight >= 0 && servers[i].port >= 0);
    free(servers);
  } else {
    FUZZ_CHECK(servers == NULL && n == 0);
    FUZZ_CHECK(strncmp(err, "nginx: ", 7) == 0);
  }

  char msg[DC_ERR_MAX];
  memset(msg, 'x', sizeof msg);
  nginx_fuzz_message(text, msg, sizeof msg);
  FUZZ_CHECK(memchr(msg, '\0', sizeof msg) != NULL);
  free(text);
  return 0;
}
