/* fuzz_http_response.c - libFuzzer target: apm_http_parse_response. */
#define FUZZ_REQUEST 0
#include "../../apm-ext.h"
#include "fuzz.h"
#include "fuzz_http.h"
