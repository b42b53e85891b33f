/* fuzz_http_request.c - libFuzzer target: apm_http_parse_request. */
#define FUZZ_REQUEST 1
#include "../../apm-ext.h"
#include "fuzz.h"
#include "fuzz_http.h"
