/*
 * data/expected-verdicts.json, compiled into the binary with C23 #embed
 * (clang 19 and later take it in any language mode). The compiler records
 * the file in this object's dependency list, so the build recompiles this
 * file whenever the JSON changes: the embedded copy cannot go stale.
 */
#include "cowpin_history.h"

#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wc23-extensions"
static const unsigned char history[] = {
#embed "../../data/expected-verdicts.json"
};
#pragma clang diagnostic pop

const unsigned char *cp_embedded_history(void) { return history; }
size_t cp_embedded_history_size(void) { return sizeof history; }
