/* The core's side of the HTTP server module (deploy-httpd.so, see
 * module.h and httpd.h): loaded the first time `deployctl serve` starts. */
#include "httpd.h"

#include "module.h"

const httpd_api *httpd_load(char *err) {
  static const httpd_api *api;
  if (!api)
    api = dc_module_api("httpd", "deploy_httpd_api", HTTPD_API_VERSION, err);
  return api;
}
