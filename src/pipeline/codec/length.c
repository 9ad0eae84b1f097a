#include "pipeline/codec/length.h"

#include "util/common.h"

int sl_length_options(const sl_opts *o, int *length, int *big, int64_t *adjustment, char *err,
                      size_t errlen) {
  static const char *const orders[] = {"big", "little", NULL};
  int64_t n;
  int order;
  if (sl_opts_int(o, "length_field_length", 1, 8, 0, 4, "1, 2, 3, 4 or 8", &n, err, errlen) !=
      SL_OK)
    return SL_ERROR;
  if (n > 4 && n != 8) {
    char shown[64];
    sl_opts_show(sl_opts_get(o, "length_field_length"), shown, sizeof(shown));
    snprintf(err, errlen, "length_field_length: expected 1, 2, 3, 4 or 8, got %s", shown);
    return SL_ERROR;
  }
  if (sl_opts_choice(o, "byte_order", orders, 0, &order, err, errlen) != SL_OK ||
      sl_opts_int(o, "length_adjustment", INT32_MIN, INT32_MAX, 0, 0,
                  "an integer from -2147483648 to 2147483647", adjustment, err, errlen) != SL_OK)
    return SL_ERROR;
  *length = (int)n;
  *big = order == 0;
  return SL_OK;
}
