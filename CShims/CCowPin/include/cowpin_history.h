/*
 * The expected-verdict file (data/expected-verdicts.json) as it was when
 * this binary was built, so that a single copied executable (a static
 * build in a lab's rootfs or a guest's initramfs) has its upstream history
 * without the checkout.
 */
#ifndef COWPIN_HISTORY_H
#define COWPIN_HISTORY_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The file's bytes (not NUL-terminated) and their count. */
const unsigned char *cp_embedded_history(void);
size_t cp_embedded_history_size(void);

#ifdef __cplusplus
}
#endif

#endif
