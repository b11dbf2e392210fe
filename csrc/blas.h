/* blas.h -- which CBLAS the kernels call.
 *
 * By default cribo builds against the scipy-openblas32 wheel from PyPI, whose
 * symbols carry a `scipy_` prefix (scipy_cblas_sgemm).  Building with
 * -DCRIBO_SYSTEM_CBLAS uses a plain system CBLAS (cblas_sgemm) instead. */
#ifndef CRIBO_BLAS_H
#define CRIBO_BLAS_H

#include <cblas.h>

#ifdef CRIBO_SYSTEM_CBLAS
#define cribo_sgemm cblas_sgemm
#define cribo_ssyrk cblas_ssyrk
#else
#define cribo_sgemm scipy_cblas_sgemm
#define cribo_ssyrk scipy_cblas_ssyrk
#endif

#endif /* CRIBO_BLAS_H */
