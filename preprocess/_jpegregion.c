/*
 * Region decoding of JPEGs with libjpeg-turbo, for fast mode (preprocess/jpegregion.py).
 *
 * A centre crop of a resized image reads only a window of the original: for a 500x375 file and
 * ImageNet's Resize(256) + CenterCrop(224), 328x328 of its 500x375 pixels (57 %), plus the resize
 * filter's support. libjpeg-turbo can decode such a window (jpeg_crop_scanline for the columns,
 * jpeg_skip_scanlines for the rows), which skips the inverse DCT, the upsampling and the colour
 * conversion of everything outside it; only the entropy decoding of the rows skipped remains.
 * simplejpeg and Pillow decode every pixel.
 *
 * Loaded with ctypes (no Python API here, so one build serves every interpreter). Built by
 * scripts/setup-env.sh or `python -m preprocess.native --build`:
 *
 *     cc -O3 -ffp-contract=off -shared -fPIC -o _jpegregion-<platform>.so _jpegregion.c -ljpeg -lm
 *
 * (-ffp-contract=off: GCC on aarch64 would fuse the filter weights' double arithmetic into FMAs,
 * which round differently; without them every platform computes x86-64's weights.)
 *
 * Strict, as simplejpeg's strict mode and TurboJPEG's TJFLAG_STOPONWARNING: a libjpeg warning
 * (corrupt data libjpeg would paper over, a premature end of file) is an error, and the caller
 * then hands the file to Pillow, which decodes it or fails it with exact mode's reason. The rows
 * after the window are not decoded when the file ends with its EOI marker (it is whole; damage in
 * them would be warnings, which Pillow ignores, and cannot change the rows above); otherwise they
 * are entropy-decoded to the last row, which is read, so that a file cut short fails as in Pillow.
 */
#include <limits.h>
#include <math.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#if !defined(JCS_EXTENSIONS)
#error "libjpeg-turbo (JCS_EXTENSIONS, jpeg_crop_scanline, jpeg_skip_scanlines) is required"
#endif

/* Bumped whenever a signature or a meaning below changes; checked by jpegregion.py. */
#define IE_ABI 5

/* Return codes */
#define IE_OK 0
#define IE_UNSUPPORTED 1 /* not a colour space we convert like Pillow (CMYK, YCCK, ...) */
#define IE_JPEG_ERROR 2  /* libjpeg error or warning; the message is in msg */
#define IE_BAD_ARGS 3    /* the caller's region or buffer does not fit; the message is in msg */
#define IE_NEED_WORK 4   /* ie_fast_crop: the work buffer is too small (the size needed is in info[2]) */

/* Flags */
#define IE_FASTDCT 1      /* JDCT_IFAST instead of the accurate JDCT_ISLOW */
#define IE_FASTUPSAMPLE 2 /* no fancy (triangle-filter) chroma upsampling */
#define IE_MIN_CROP 32 /* narrowest window decoded (pixels) */

#define IE_SCALAR 8       /* resize with the scalar code even where SSE4.1/AVX2/NEON are there (tests) */
#define IE_DECODE_ONLY 16 /* ie_fast_crop: decode the window, resize nothing (bench_decode's ceiling) */

struct ie_error {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char *msg;
  int msglen;
};

static void ie_keep_message(j_common_ptr cinfo)
{
  struct ie_error *err = (struct ie_error *)cinfo->err;
  char buffer[JMSG_LENGTH_MAX];

  if (err->msg == NULL || err->msglen <= 0)
    return;
  (*cinfo->err->format_message)(cinfo, buffer);
  strncpy(err->msg, buffer, (size_t)err->msglen - 1);
  err->msg[err->msglen - 1] = '\0';
}

static void ie_error_exit(j_common_ptr cinfo)
{
  ie_keep_message(cinfo);
  longjmp(((struct ie_error *)cinfo->err)->jump, 1);
}

static void ie_emit_message(j_common_ptr cinfo, int msg_level)
{
  if (msg_level < 0) { /* a warning: strict, as TurboJPEG's TJFLAG_STOPONWARNING */
    ie_keep_message(cinfo);
    longjmp(((struct ie_error *)cinfo->err)->jump, 1);
  }
  /* trace messages (msg_level >= 0): ignored */
}

static void ie_set_message(char *msg, int msglen, const char *text)
{
  if (msg == NULL || msglen <= 0)
    return;
  strncpy(msg, text, (size_t)msglen - 1);
  msg[msglen - 1] = '\0';
}

/* Bytes of the RGBX window ie_decode() may write for a window w x h asked for. */
static size_t ie_window_bytes(int w, int h)
{
  return (size_t)((w < IE_MIN_CROP ? IE_MIN_CROP : w) + 32) * (size_t)(h + 64) * 4;
}

/* Our error manager on a zeroed cinfo: errors and warnings longjmp to err->jump (which the caller
 * sets with setjmp right after: it must be in the function that calls libjpeg) with the message. */
static void ie_errors(struct jpeg_decompress_struct *cinfo, struct ie_error *err, char *msg, int msglen)
{
  memset(cinfo, 0, sizeof(*cinfo));
  cinfo->err = jpeg_std_error(&err->pub);
  err->pub.error_exit = ie_error_exit;
  err->pub.emit_message = ie_emit_message;
  err->msg = msg;
  err->msglen = msglen;
}

int ie_abi(void)
{
  return IE_ABI;
}

/* libjpeg-turbo's version as built against, e.g. 2001005 for 2.1.5 (0 when unknown). */
int ie_turbo_version(void)
{
#ifdef LIBJPEG_TURBO_VERSION_NUMBER
  return LIBJPEG_TURBO_VERSION_NUMBER;
#else
  return 0;
#endif
}

/*
 * The header: info[0] = width, info[1] = height, info[2] = J_COLOR_SPACE of the file (1 gray,
 * 2 RGB, 3 YCbCr, 4 CMYK, 5 YCCK), info[3] = number of components, info[4] = progressive (0/1).
 */
int ie_header(const unsigned char *data, unsigned long size, int *info, char *msg, int msglen)
{
  struct jpeg_decompress_struct cinfo;
  struct ie_error err;

  ie_errors(&cinfo, &err, msg, msglen);
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return IE_JPEG_ERROR;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  info[0] = (int)cinfo.image_width;
  info[1] = (int)cinfo.image_height;
  info[2] = (int)cinfo.jpeg_color_space;
  info[3] = cinfo.num_components;
  info[4] = cinfo.progressive_mode ? 1 : 0;
  jpeg_destroy_decompress(&cinfo);
  return IE_OK;
}

/*
 * Decode at least rows [y0, y0 + h) and columns [x0, x0 + w) of the image scaled by 1/denom
 * (denom 1, 2, 4 or 8), as RGBX, into out (out_size bytes).
 *
 * The window written is widened to libjpeg-turbo's units: its columns start on an iMCU boundary at
 * or left of x0 (jpeg_crop_scanline's rule) and it is at least IE_MIN_CROP wide, and its rows start
 * and end on iMCU-row boundaries (or the image's last row), because jpeg_skip_scanlines() is only
 * reliable from such a boundary: libjpeg-turbo 2.1.5 loops forever when a skip of an odd number of
 * rows precedes a read with merged (non-fancy) upsampling, and its issue #915 (2026) fixes rows
 * returned from before a skip that starts inside a row group. got[0], got[1]: the first column and
 * the width written (covering [x0, x0 + w)); got[4], got[5]: the first row and the number of rows;
 * rows are got[1] * 4 bytes apart. got[2], got[3]: the scaled image's width and height. out must hold (max(w, 32) + 32) * (h + 64) * 4 bytes (32:
 * the widest iMCU; 64: two of the tallest iMCU rows).
 */
/* What to decode, when it depends on the image's size: ie_decode_at calls fn with the header's size
 * (before anything is decoded), and fn fills denom, the window and out, or returns a code that ends
 * the decode (ie_fast_crop's geometry). */
struct ie_plan {
  int (*fn)(struct ie_plan *plan, int width, int height);
  int denom, x0, y0, w, h;
  unsigned char *out;
  unsigned long out_size;
};

static int ie_decode_at(const unsigned char *data, unsigned long size, int denom, int flags, int x0, int y0,
                       int w, int h, unsigned char *out, unsigned long out_size, size_t placed_stride, int *got,
                       char *msg, int msglen, struct ie_plan *plan);

int ie_decode(const unsigned char *data, unsigned long size, int denom, int flags, int x0, int y0, int w,
              int h, unsigned char *out, unsigned long out_size, int *got, char *msg, int msglen)
{
  return ie_decode_at(data, size, denom, flags, x0, y0, w, h, out, out_size, 0, got, msg, msglen, NULL);
}

/*
 * ie_decode(), but the window's pixels land where they are in the whole (scaled) image: out is an
 * RGBX image of the scaled size with rows out_stride bytes apart (at least width * 4), and row r,
 * column c of the image is written at out + r * out_stride + c * 4. Pixels outside the window are
 * left as they were. Exact mode uses it: Pillow's resize of that image, cropped, reads only window
 * pixels.
 */
int ie_decode_placed(const unsigned char *data, unsigned long size, int denom, int flags, int x0, int y0,
                     int w, int h, unsigned char *out, unsigned long out_size, long out_stride, int *got,
                     char *msg, int msglen)
{
  if (out_stride <= 0) {
    ie_set_message(msg, msglen, "out_stride must be positive");
    return IE_BAD_ARGS;
  }
  return ie_decode_at(data, size, denom, flags, x0, y0, w, h, out, out_size, (size_t)out_stride, got, msg,
                      msglen, NULL);
}

/* Whether the data ends with an EOI marker (FF D9). Entropy-coded data cannot hold one (a 0xFF
 * there is followed by 0x00 or a restart marker), so a file cut inside its scan never does. */
static int ie_ends_with_eoi(const unsigned char *data, unsigned long size)
{
  return size >= 4 && data[size - 2] == 0xFF && data[size - 1] == 0xD9;
}

/* The rows of ie_decode_at, once the header is read (a longjmp from libjpeg lands in ie_decode_at,
 * which destroys cinfo). */
static int ie_decode_rows(struct jpeg_decompress_struct *cinfo, const unsigned char *data, unsigned long size,
                          int denom, int flags, int x0, int y0, int w, int h, unsigned char *out,
                          unsigned long out_size, size_t placed_stride, int *got, char *msg, int msglen)
{
  JDIMENSION xoff, width, imcu, start, stop, skip;
  JSAMPROW rows[16];
  size_t stride;
  int i, n;

  cinfo->out_color_space = JCS_EXT_RGBX;
  cinfo->scale_num = 1;
  cinfo->scale_denom = (unsigned int)denom;
  cinfo->dct_method = (flags & IE_FASTDCT) ? JDCT_IFAST : JDCT_ISLOW;
  cinfo->do_fancy_upsampling = (flags & IE_FASTUPSAMPLE) ? FALSE : TRUE;
  jpeg_calc_output_dimensions(cinfo);
  got[2] = (int)cinfo->output_width;
  got[3] = (int)cinfo->output_height;
  if ((JDIMENSION)x0 + (JDIMENSION)w > cinfo->output_width ||
      (JDIMENSION)y0 + (JDIMENSION)h > cinfo->output_height) {
    ie_set_message(msg, msglen, "region outside the scaled image");
    return IE_BAD_ARGS;
  }
  if (placed_stride ? (placed_stride < (size_t)cinfo->output_width * 4 ||
                       placed_stride * cinfo->output_height > out_size)
                    : ie_window_bytes(w, h) > out_size) {
    ie_set_message(msg, msglen, "output buffer too small");
    return IE_BAD_ARGS;
  }
  jpeg_start_decompress(cinfo);
  xoff = (JDIMENSION)x0;
  width = (JDIMENSION)w;
  if (width < IE_MIN_CROP) {
    /* libjpeg-turbo's fancy upsampling is wrong inside windows 1 or 2 pixels wide (the whole
     * window is its edge): no window narrower than IE_MIN_CROP */
    xoff = xoff > (IE_MIN_CROP - width) / 2 ? xoff - (IE_MIN_CROP - width) / 2 : 0;
    width = IE_MIN_CROP;
    if (xoff + width > cinfo->output_width) {
      width = cinfo->output_width < IE_MIN_CROP ? cinfo->output_width : IE_MIN_CROP;
      xoff = cinfo->output_width - width;
    }
  }
  if (width < cinfo->output_width)
    jpeg_crop_scanline(cinfo, &xoff, &width);
  got[0] = (int)xoff;
  got[1] = (int)width;
  stride = (size_t)width * 4;
#if JPEG_LIB_VERSION >= 70
  imcu = (JDIMENSION)(cinfo->max_v_samp_factor * cinfo->min_DCT_v_scaled_size);
#else
  imcu = (JDIMENSION)(cinfo->max_v_samp_factor * cinfo->min_DCT_scaled_size);
#endif
  if (imcu < 1)
    imcu = 1;
  start = ((JDIMENSION)y0 / imcu) * imcu;
  stop = (((JDIMENSION)(y0 + h) + imcu - 1) / imcu) * imcu;
  if (stop > cinfo->output_height)
    stop = cinfo->output_height;
  got[4] = (int)start;
  got[5] = (int)(stop - start);
  if (start > 0 && jpeg_skip_scanlines(cinfo, start) != start) {
    ie_set_message(msg, msglen, "could not skip to the region");
    return IE_JPEG_ERROR;
  }
  while (cinfo->output_scanline < stop) {
    n = (int)(stop - cinfo->output_scanline);
    if (n > 16)
      n = 16;
    for (i = 0; i < n; i++)
      rows[i] = placed_stride
                    ? out + (size_t)(cinfo->output_scanline + (JDIMENSION)i) * placed_stride + (size_t)xoff * 4
                    : out + (size_t)(cinfo->output_scanline - start + (JDIMENSION)i) * stride;
    if (jpeg_read_scanlines(cinfo, rows, (JDIMENSION)n) == 0)
      goto no_rows;
  }
  if (cinfo->output_scanline < cinfo->output_height && ie_ends_with_eoi(data, size)) {
    /* The rows below the window: nothing of them is needed, and the file is whole (it ends with
     * its EOI marker), so they are not decoded at all. Damage inside their entropy-coded data
     * gives libjpeg warnings only, which Pillow ignores: the file decodes there too, with the
     * same pixels above the damage. */
    jpeg_skip_scanlines(cinfo, cinfo->output_height - cinfo->output_scanline);
  } else if (cinfo->output_scanline < cinfo->output_height) {
    /* A file that does not end with EOI (cut short, or bytes after its EOI): the rows below the
     * window are entropy-decoded (skipping to the very end would not read them at all), then the
     * last row is read, so that a cut anywhere in the file is seen, as Pillow sees it. */
    skip = cinfo->output_height - cinfo->output_scanline - 1;
    if (skip > 0 && jpeg_skip_scanlines(cinfo, skip) != skip) {
      ie_set_message(msg, msglen, "could not skip past the region");
      return IE_JPEG_ERROR;
    }
    rows[0] = (JSAMPROW)(*cinfo->mem->alloc_large)((j_common_ptr)cinfo, JPOOL_IMAGE, stride);
    while (cinfo->output_scanline < cinfo->output_height)
      if (jpeg_read_scanlines(cinfo, rows, 1) == 0)
        goto no_rows;
  }
  jpeg_finish_decompress(cinfo);
  return IE_OK;
no_rows: /* never seen from an in-memory source; rather than loop, Pillow takes the file */
  ie_set_message(msg, msglen, "libjpeg returned no rows");
  return IE_JPEG_ERROR;
}


/* placed_stride 0: the window packed at out (ie_decode); else placed in the image (ie_decode_placed).
 * plan: NULL, or what replaces denom, the window and out once the header is read. */
static int ie_decode_at(const unsigned char *data, unsigned long size, int denom, int flags, int x0, int y0,
                       int w, int h, unsigned char *out, unsigned long out_size, size_t placed_stride, int *got,
                       char *msg, int msglen, struct ie_plan *plan)
{
  struct jpeg_decompress_struct cinfo;
  struct ie_error err;
  int rc;

  if (plan == NULL && (denom != 1 && denom != 2 && denom != 4 && denom != 8)) {
    ie_set_message(msg, msglen, "denom must be 1, 2, 4 or 8");
    return IE_BAD_ARGS;
  }
  if (plan == NULL && (x0 < 0 || y0 < 0 || w < 1 || h < 1)) {
    ie_set_message(msg, msglen, "empty or negative region");
    return IE_BAD_ARGS;
  }
  ie_errors(&cinfo, &err, msg, msglen);
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return IE_JPEG_ERROR;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE &&
      cinfo.jpeg_color_space != JCS_RGB) {
    jpeg_destroy_decompress(&cinfo);
    ie_set_message(msg, msglen, "colour space not decoded here");
    return IE_UNSUPPORTED;
  }
  if (plan == NULL) {
    rc = ie_decode_rows(&cinfo, data, size, denom, flags, x0, y0, w, h, out, out_size, placed_stride, got, msg,
                        msglen);
  } else {
    rc = plan->fn(plan, (int)cinfo.image_width, (int)cinfo.image_height);
    if (rc == IE_OK && ((plan->denom != 1 && plan->denom != 2 && plan->denom != 4 && plan->denom != 8) ||
                        plan->x0 < 0 || plan->y0 < 0 || plan->w < 1 || plan->h < 1)) {
      ie_set_message(msg, msglen, "the plan's scale or region is wrong");
      rc = IE_BAD_ARGS;
    }
    if (rc == IE_OK)
      rc = ie_decode_rows(&cinfo, data, size, plan->denom, flags, plan->x0, plan->y0, plan->w, plan->h,
                          plan->out, plan->out_size, placed_stride, got, msg, msglen);
  }
  jpeg_destroy_decompress(&cinfo);
  return rc;
}

/* ------------------------------------------------------------------------------------------------
 * Resize of the crop's box, written as RGB: Pillow-SIMD's Image.resize(size, filter, box)
 * arithmetic, 8 bits per channel: per output pixel, filter weights in double precision from the box
 * given as single-precision floats, normalised, rounded to int16 with as many fractional bits as
 * fit (at most 22); a horizontal pass over the rows the vertical pass reads, rounded to 8 bits,
 * then the vertical pass. Stock Pillow keeps 22 bits in int32: at most 2 apart, rarely 2 (each pass
 * rounds; tests/test_jpegregion.py's STOCK_MAX_DIFF says why). Doing it here
 * spares fast mode Pillow's image objects and the RGBX -> RGB repacking per image.
 */

#define IE_PRECISION_BITS (32 - 8 - 2)

/* The vector passes (SSE4.1 and AVX2) are picked at run time by the CPU, so one build runs on any
 * x86-64 and uses the vector units where they are; elsewhere the scalar passes, same sums. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(IE_NO_SIMD)
#define IE_SSE41 1
#include <immintrin.h>
#else
#define IE_SSE41 0
#endif
/* On aarch64 NEON (Advanced SIMD) is part of the base ISA: picked at compile time there, and
 * IE_SCALAR still turns it off at run time (tests compare the two). */
#if defined(__aarch64__) && defined(__ARM_NEON) && defined(__GNUC__) && !defined(IE_NO_SIMD)
#define IE_NEON 1
#include <arm_neon.h>
#else
#define IE_NEON 0
#endif

/* Pillow's filter numbers (Image.Resampling) */
#define IE_LANCZOS 1
#define IE_BILINEAR 2
#define IE_BICUBIC 3
#define IE_BOX 4
#define IE_HAMMING 5

static double ie_box(double x)
{
  return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0;
}

static double ie_bilinear(double x)
{
  x = fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

static double ie_hamming(double x)
{
  x = fabs(x);
  if (x == 0.0)
    return 1.0;
  if (x >= 1.0)
    return 0.0;
  x = x * M_PI;
  return sin(x) / x * (0.54f + 0.46f * cos(x)); /* float constants, as Pillow has them */
}

static double ie_bicubic(double x)
{
  const double a = -0.5;

  x = fabs(x);
  if (x < 1.0)
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0)
    return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

static double ie_sinc(double x)
{
  if (x == 0.0)
    return 1.0;
  x = x * M_PI;
  return sin(x) / x;
}

static double ie_lanczos(double x)
{
  return (-3.0 <= x && x < 3.0) ? ie_sinc(x) * ie_sinc(x / 3) : 0.0;
}

struct ie_filter {
  double (*fn)(double);
  double support;
};

static int ie_pick_filter(int filter, struct ie_filter *f)
{
  switch (filter) {
  case IE_BOX: f->fn = ie_box; f->support = 0.5; return 1;
  case IE_BILINEAR: f->fn = ie_bilinear; f->support = 1.0; return 1;
  case IE_HAMMING: f->fn = ie_hamming; f->support = 1.0; return 1;
  case IE_BICUBIC: f->fn = ie_bicubic; f->support = 2.0; return 1;
  case IE_LANCZOS: f->fn = ie_lanczos; f->support = 3.0; return 1;
  default: return 0;
  }
}

/* Taps per output pixel for a box [in0, in1) resized to out_size: Pillow's ksize. */
static int ie_ksize(float in0, float in1, int out_size, const struct ie_filter *f)
{
  double scale = (double)(in1 - in0) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;

  return (int)ceil(f->support * filterscale) * 2 + 1;
}

/* Pillow's normalised filter weights wn[out_size * ksize] (zeros past each pixel's taps) and
 * bounds[out_size * 2] (first input, count) for the box [in0, in1) resized to out_size; w: ksize
 * doubles of scratch. */
static void ie_coeffs(int in_size, float in0, float in1, int out_size, const struct ie_filter *f,
                      int ksize, int *bounds, double *w, double *wn)
{
  double scale = (double)(in1 - in0) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = f->support * filterscale;
  double ss = 1.0 / filterscale;
  int xx, x, xmin, xmax;

  for (xx = 0; xx < out_size; xx++) {
    double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;

    xmin = (int)(center - support + 0.5);
    if (xmin < 0)
      xmin = 0;
    xmax = (int)(center + support + 0.5);
    if (xmax > in_size)
      xmax = in_size;
    xmax -= xmin;
    if (xmax < 0)
      xmax = 0;
    for (x = 0; x < xmax; x++) {
      w[x] = f->fn((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (x = 0; x < ksize; x++)
      wn[xx * ksize + x] = x < xmax ? (ww != 0.0 ? w[x] / ww : w[x]) : 0.0;
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
}

static inline unsigned char ie_clip8(int32_t v, int prec)
{
  v >>= prec;
  return (unsigned char)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

/* Pillow-SIMD's fixed point for a pass (its normalize_coeffs_8bpc): the most fractional bits, at
 * most 22, that keep every weight an int16. */
static int ie_precision(const double *w, int n)
{
  double hi = 0.0, lo = 0.0;
  int i, p;

  for (i = 0; i < n; i++) {
    if (w[i] > hi)
      hi = w[i];
    if (w[i] < lo)
      lo = w[i];
  }
  for (p = 0; p < IE_PRECISION_BITS; p++)
    if ((int)(0.5 + hi * (1 << (p + 1))) >= (1 << 15) || (int)(-0.5 + lo * (1 << (p + 1))) < -(1 << 15))
      break;
  return p;
}

/* The weights w[out * ksize] as int16 with prec fractional bits, rounded as Pillow rounds, into
 * k[out * kpad] (kpad >= ksize, even; zeros past the taps): taps 2j and 2j + 1 are one int32 pair
 * for the multiply-add of two pixels or two rows at once. */
static void ie_weights16(const double *w, int out, int ksize, int kpad, int prec, int16_t *k)
{
  int i, x;

  for (i = 0; i < out; i++)
    for (x = 0; x < kpad; x++) {
      double v = x < ksize ? w[i * ksize + x] * (1 << prec) : 0.0;

      k[i * kpad + x] = (int16_t)(v < 0 ? -0.5 + v : 0.5 + v);
    }
}

static inline int32_t ie_pair(const int16_t *k)
{
  int32_t v;

  memcpy(&v, k, sizeof(v));
  return v;
}

/* RGBX rows [first, first + rows) of src (width src_w) -> RGBX tmp (out_w wide), horizontally, with
 * int16 weights k (kpad per output pixel, prec fractional bits) and bounds (first input, count). */
static void ie_horizontal(const unsigned char *src, int src_w, int first, int rows, unsigned char *tmp,
                          int out_w, int kpad, const int16_t *kk, const int *bounds, int prec)
{
  int yy, xx, x, c;

  for (yy = 0; yy < rows; yy++) {
    const unsigned char *row = src + (size_t)(first + yy) * (size_t)src_w * 4;
    unsigned char *o = tmp + (size_t)yy * (size_t)out_w * 4;

    for (xx = 0; xx < out_w; xx++) {
      const unsigned char *p = row + (size_t)bounds[xx * 2] * 4;
      const int16_t *k = kk + xx * kpad;
      int n = bounds[xx * 2 + 1];
      int32_t ss[4] = { 1 << (prec - 1), 1 << (prec - 1), 1 << (prec - 1), 1 << (prec - 1) };

      for (x = 0; x < n; x++)
        for (c = 0; c < 4; c++)
          ss[c] += p[x * 4 + c] * k[x];
      for (c = 0; c < 4; c++)
        o[xx * 4 + c] = ie_clip8(ss[c], prec);
    }
  }
}

/* RGBX tmp (width w) -> RGB rows of dst, vertically, weights as for ie_horizontal; output rows
 * pixels [x_from, w) of each. */
static void ie_vertical(const unsigned char *tmp, int w, int out_h, int x_from, int kpad, const int16_t *kk,
                        const int *bounds, int prec, unsigned char *dst, long dst_stride)
{
  int yy, y, i, c, n4 = w * 4;

  for (yy = 0; yy < out_h; yy++) {
    const int16_t *k = kk + yy * kpad;
    const unsigned char *base = tmp + (size_t)bounds[yy * 2] * (size_t)n4;
    int n = bounds[yy * 2 + 1];
    unsigned char *o = dst + (long)yy * dst_stride;

    for (i = x_from; i < w; i++)
      for (c = 0; c < 3; c++) {
        int32_t ss = 1 << (prec - 1);

        for (y = 0; y < n; y++)
          ss += base[(size_t)y * (size_t)n4 + (size_t)i * 4 + (size_t)c] * k[y];
        o[i * 3 + c] = ie_clip8(ss, prec);
      }
  }
}

#if IE_SSE41
/*
 * The vector passes: the same sums as the scalar ones, bit for bit (int16 weights, pairs of taps
 * per pmaddwd, as Pillow-SIMD). The horizontal pass takes four rows at a time, so that each pair
 * of weights is loaded once for them; the vertical pass keeps its sums in registers over all taps
 * and packs RGBX to RGB on the way out.
 *
 * The horizontal passes read 2 * ceil(taps / 2) pixels from each output pixel's first input (the
 * weight of one past the taps is zero), which the caller keeps inside the buffer.
 */
#define IE_H_ORDER() _mm_setr_epi8(0, -1, 4, -1, 1, -1, 5, -1, 2, -1, 6, -1, 3, -1, 7, -1)

__attribute__((target("sse4.1"))) static void ie_horizontal_sse41(
    const unsigned char *src, int src_w, int first, int rows, unsigned char *tmp, int out_w, int kpad,
    const int16_t *kk, const int *bounds, int prec)
{
  /* bytes of two pixels p0 p1 -> int16 lanes p0.r p1.r p0.g p1.g p0.b p1.b p0.x p1.x */
  const __m128i order = IE_H_ORDER();
  const __m128i half = _mm_set1_epi32(1 << (prec - 1));
  size_t rs = (size_t)src_w * 4;
  int yy, xx, j;

  for (yy = 0; yy < rows; yy += 4) {
    const unsigned char *r0 = src + (size_t)(first + yy) * rs;
    int m = rows - yy < 4 ? rows - yy : 4; /* rows in this group: the missing ones repeat the last */
    const unsigned char *r1 = m > 1 ? r0 + rs : r0, *r2 = m > 2 ? r0 + 2 * rs : r1, *r3 = m > 3 ? r0 + 3 * rs : r2;
    uint32_t *o = (uint32_t *)(void *)(tmp + (size_t)yy * (size_t)out_w * 4);

    for (xx = 0; xx < out_w; xx++) {
      size_t off = (size_t)bounds[xx * 2] * 4;
      const int16_t *k = kk + xx * kpad;
      int n = (bounds[xx * 2 + 1] + 1) / 2;
      __m128i a0 = half, a1 = half, a2 = half, a3 = half;

      for (j = 0; j < n; j++) {
        __m128i kj = _mm_set1_epi32(ie_pair(k + 2 * j));

#define IE_H_TAP(acc, r) acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_shuffle_epi8( \
            _mm_loadl_epi64((const __m128i *)(const void *)(r + off + 8 * (size_t)j)), order), kj))
        IE_H_TAP(a0, r0);
        IE_H_TAP(a1, r1);
        IE_H_TAP(a2, r2);
        IE_H_TAP(a3, r3);
#undef IE_H_TAP
      }
      /* four rows' sums -> int16 [r0 r1] [r2 r3] -> bytes [r0 r1 r2 r3]: one pack for four */
      a0 = _mm_packus_epi16(_mm_packs_epi32(_mm_srai_epi32(a0, prec), _mm_srai_epi32(a1, prec)),
                            _mm_packs_epi32(_mm_srai_epi32(a2, prec), _mm_srai_epi32(a3, prec)));
      o[xx] = (uint32_t)_mm_cvtsi128_si32(a0);
      if (m > 1)
        o[out_w + xx] = (uint32_t)_mm_extract_epi32(a0, 1);
      if (m > 2)
        o[2 * out_w + xx] = (uint32_t)_mm_extract_epi32(a0, 2);
      if (m > 3)
        o[3 * out_w + xx] = (uint32_t)_mm_extract_epi32(a0, 3);
    }
  }
}

__attribute__((target("avx2"))) static void ie_horizontal_avx2(
    const unsigned char *src, int src_w, int first, int rows, unsigned char *tmp, int out_w, int kpad,
    const int16_t *kk, const int *bounds, int prec)
{
  const __m256i order = _mm256_broadcastsi128_si256(IE_H_ORDER()), half = _mm256_set1_epi32(1 << (prec - 1));
  size_t rs = (size_t)src_w * 4;
  int yy, xx, j;

  for (yy = 0; yy < rows; yy += 4) {
    const unsigned char *r0 = src + (size_t)(first + yy) * rs;
    int m = rows - yy < 4 ? rows - yy : 4;
    const unsigned char *r1 = m > 1 ? r0 + rs : r0, *r2 = m > 2 ? r0 + 2 * rs : r1, *r3 = m > 3 ? r0 + 3 * rs : r2;
    uint32_t *o = (uint32_t *)(void *)(tmp + (size_t)yy * (size_t)out_w * 4);

    for (xx = 0; xx < out_w; xx++) {
      size_t off = (size_t)bounds[xx * 2] * 4;
      const int16_t *k = kk + xx * kpad;
      int n = (bounds[xx * 2 + 1] + 1) / 2;
      __m256i a01 = half, a23 = half;
      __m128i lo, hi;

      for (j = 0; j < n; j++) {
        __m256i kj = _mm256_set1_epi32(ie_pair(k + 2 * j)), p;
        size_t at = off + 8 * (size_t)j;

        /* rows 0 and 1 in the two halves of one register, rows 2 and 3 in another */
        p = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadl_epi64((const __m128i *)(const void *)(r0 + at))),
                                    _mm_loadl_epi64((const __m128i *)(const void *)(r1 + at)), 1);
        a01 = _mm256_add_epi32(a01, _mm256_madd_epi16(_mm256_shuffle_epi8(p, order), kj));
        p = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadl_epi64((const __m128i *)(const void *)(r2 + at))),
                                    _mm_loadl_epi64((const __m128i *)(const void *)(r3 + at)), 1);
        a23 = _mm256_add_epi32(a23, _mm256_madd_epi16(_mm256_shuffle_epi8(p, order), kj));
      }
      /* rows 0|1 and 2|3 -> int16 [r0 r2 | r1 r3] -> bytes [r0 r2 .. | r1 r3 ..]: one pack for four */
      a01 = _mm256_packs_epi32(_mm256_srai_epi32(a01, prec), _mm256_srai_epi32(a23, prec));
      a01 = _mm256_packus_epi16(a01, a01);
      lo = _mm256_castsi256_si128(a01);
      hi = _mm256_extracti128_si256(a01, 1);
      o[xx] = (uint32_t)_mm_cvtsi128_si32(lo);
      if (m > 1)
        o[out_w + xx] = (uint32_t)_mm_cvtsi128_si32(hi);
      if (m > 2)
        o[2 * out_w + xx] = (uint32_t)_mm_extract_epi32(lo, 1);
      if (m > 3)
        o[3 * out_w + xx] = (uint32_t)_mm_extract_epi32(hi, 1);
    }
  }
}

/* RGBX -> RGB within each 16-byte lane: 12 bytes, then 4 zeros */
#define IE_RGB_ORDER() _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1)

/* Sums of rows a, b weighted by the pair kj, added to acc[0..3] (16 bytes of each row). */
__attribute__((target("sse4.1"))) static inline void ie_v_taps128(__m128i a, __m128i b, __m128i kj, __m128i *acc)
{
  const __m128i zero = _mm_setzero_si128();
  __m128i lo = _mm_unpacklo_epi8(a, b), hi = _mm_unpackhi_epi8(a, b);

  acc[0] = _mm_add_epi32(acc[0], _mm_madd_epi16(_mm_unpacklo_epi8(lo, zero), kj));
  acc[1] = _mm_add_epi32(acc[1], _mm_madd_epi16(_mm_unpackhi_epi8(lo, zero), kj));
  acc[2] = _mm_add_epi32(acc[2], _mm_madd_epi16(_mm_unpacklo_epi8(hi, zero), kj));
  acc[3] = _mm_add_epi32(acc[3], _mm_madd_epi16(_mm_unpackhi_epi8(hi, zero), kj));
}

/* The vertical pass, 4 pixels (16 bytes) at a time; returns the first pixel it left to the scalar
 * code. An RGB store writes 16 bytes for 12: where the 4 past them are not the next pixels' (which
 * come later), at a row's end, it goes through a local buffer. */
__attribute__((target("sse4.1"))) static int ie_vertical_sse41(
    const unsigned char *tmp, int w, int out_h, int kpad, const int16_t *kk, const int *bounds, int prec,
    unsigned char *dst, long dst_stride)
{
  const __m128i half = _mm_set1_epi32(1 << (prec - 1)), rgb = IE_RGB_ORDER();
  size_t n4 = (size_t)w * 4;
  int yy, y, i, stop = (w / 4) * 4;

  for (yy = 0; yy < out_h; yy++) {
    const int16_t *k = kk + yy * kpad;
    const unsigned char *base = tmp + (size_t)bounds[yy * 2] * n4;
    int n = bounds[yy * 2 + 1];
    unsigned char *o = dst + (long)yy * dst_stride;

    for (i = 0; i < stop; i += 4) {
      __m128i acc[4] = { half, half, half, half }, p01, p23, px;
      const unsigned char *col = base + (size_t)i * 4;

      for (y = 0; y + 1 < n; y += 2)
        ie_v_taps128(_mm_loadu_si128((const __m128i *)(const void *)(col + (size_t)y * n4)),
                     _mm_loadu_si128((const __m128i *)(const void *)(col + (size_t)(y + 1) * n4)),
                     _mm_set1_epi32(ie_pair(k + y)), acc);
      if (y < n) /* an odd number of taps: the last row with a zero partner */
        ie_v_taps128(_mm_loadu_si128((const __m128i *)(const void *)(col + (size_t)y * n4)), _mm_setzero_si128(),
                     _mm_set1_epi32((int32_t)(uint16_t)k[y]), acc);
      p01 = _mm_packs_epi32(_mm_srai_epi32(acc[0], prec), _mm_srai_epi32(acc[1], prec));
      p23 = _mm_packs_epi32(_mm_srai_epi32(acc[2], prec), _mm_srai_epi32(acc[3], prec));
      px = _mm_shuffle_epi8(_mm_packus_epi16(p01, p23), rgb);
      if (i + 6 <= w) {
        _mm_storeu_si128((__m128i *)(void *)(o + i * 3), px);
      } else {
        unsigned char last[16];

        _mm_storeu_si128((__m128i *)(void *)last, px);
        memcpy(o + i * 3, last, 12);
      }
    }
  }
  return stop;
}

__attribute__((target("avx2"))) static inline void ie_v_taps256(__m256i a, __m256i b, __m256i kj, __m256i *acc)
{
  const __m256i zero = _mm256_setzero_si256();
  __m256i lo = _mm256_unpacklo_epi8(a, b), hi = _mm256_unpackhi_epi8(a, b);

  acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(_mm256_unpacklo_epi8(lo, zero), kj));
  acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, zero), kj));
  acc[2] = _mm256_add_epi32(acc[2], _mm256_madd_epi16(_mm256_unpacklo_epi8(hi, zero), kj));
  acc[3] = _mm256_add_epi32(acc[3], _mm256_madd_epi16(_mm256_unpackhi_epi8(hi, zero), kj));
}

/* As ie_vertical_sse41, 8 pixels (32 bytes) at a time. */
__attribute__((target("avx2"))) static int ie_vertical_avx2(
    const unsigned char *tmp, int w, int out_h, int kpad, const int16_t *kk, const int *bounds, int prec,
    unsigned char *dst, long dst_stride)
{
  const __m256i half = _mm256_set1_epi32(1 << (prec - 1)), rgb = _mm256_broadcastsi128_si256(IE_RGB_ORDER());
  size_t n4 = (size_t)w * 4;
  int yy, y, i, stop = (w / 8) * 8;

  for (yy = 0; yy < out_h; yy++) {
    const int16_t *k = kk + yy * kpad;
    const unsigned char *base = tmp + (size_t)bounds[yy * 2] * n4;
    int n = bounds[yy * 2 + 1];
    unsigned char *o = dst + (long)yy * dst_stride;

    for (i = 0; i < stop; i += 8) {
      __m256i acc[4] = { half, half, half, half }, p01, p23, px;
      const unsigned char *col = base + (size_t)i * 4;

      for (y = 0; y + 1 < n; y += 2)
        ie_v_taps256(_mm256_loadu_si256((const __m256i *)(const void *)(col + (size_t)y * n4)),
                     _mm256_loadu_si256((const __m256i *)(const void *)(col + (size_t)(y + 1) * n4)),
                     _mm256_set1_epi32(ie_pair(k + y)), acc);
      if (y < n)
        ie_v_taps256(_mm256_loadu_si256((const __m256i *)(const void *)(col + (size_t)y * n4)),
                     _mm256_setzero_si256(), _mm256_set1_epi32((int32_t)(uint16_t)k[y]), acc);
      /* unpack and pack are inverses lane by lane: the bytes come back in order */
      p01 = _mm256_packs_epi32(_mm256_srai_epi32(acc[0], prec), _mm256_srai_epi32(acc[1], prec));
      p23 = _mm256_packs_epi32(_mm256_srai_epi32(acc[2], prec), _mm256_srai_epi32(acc[3], prec));
      px = _mm256_shuffle_epi8(_mm256_packus_epi16(p01, p23), rgb);
      if (i + 10 <= w) {
        _mm_storeu_si128((__m128i *)(void *)(o + i * 3), _mm256_castsi256_si128(px));
        _mm_storeu_si128((__m128i *)(void *)(o + i * 3 + 12), _mm256_extracti128_si256(px, 1));
      } else {
        unsigned char last[28];

        _mm_storeu_si128((__m128i *)(void *)last, _mm256_castsi256_si128(px));
        _mm_storeu_si128((__m128i *)(void *)(last + 12), _mm256_extracti128_si256(px, 1));
        memcpy(o + i * 3, last, 24);
      }
    }
  }
  return stop;
}
#endif

#if IE_NEON
/*
 * The NEON passes: the same int32 sums of uint8 pixels times int16 weights as the scalar ones (and
 * so as the SSE4.1/AVX2 passes and Pillow-SIMD), bit for bit: vmlal_n_s16 is an exact widening
 * multiply-add, and the narrowing (vqmovn_s32, then vqmovun_s16) saturates to 0..255 as
 * ie_clip8 clips. Unlike the x86 horizontal passes they read no pixel past a tap (an odd last tap
 * is loaded alone), so they need no reach check.
 */
static void ie_horizontal_neon(const unsigned char *src, int src_w, int first, int rows, unsigned char *tmp,
                               int out_w, int kpad, const int16_t *kk, const int *bounds, int prec)
{
  const int32x4_t half = vdupq_n_s32(1 << (prec - 1)), shift = vdupq_n_s32(-prec);
  int yy, xx, x;

  for (yy = 0; yy < rows; yy++) {
    const unsigned char *row = src + (size_t)(first + yy) * (size_t)src_w * 4;
    unsigned char *o = tmp + (size_t)yy * (size_t)out_w * 4;

    for (xx = 0; xx < out_w; xx++) {
      const unsigned char *p = row + (size_t)bounds[xx * 2] * 4;
      const int16_t *k = kk + xx * kpad;
      int n = bounds[xx * 2 + 1];
      int32x4_t acc = half; /* r g b x of one output pixel */
      int16x4_t s16;
      uint32_t px;

      for (x = 0; x + 1 < n; x += 2) { /* two input pixels (8 bytes) per step */
        int16x8_t two = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(p + (size_t)x * 4)));

        acc = vmlal_n_s16(acc, vget_low_s16(two), k[x]);
        acc = vmlal_n_s16(acc, vget_high_s16(two), k[x + 1]);
      }
      if (x < n) {
        memcpy(&px, p + (size_t)x * 4, 4);
        acc = vmlal_n_s16(acc, vget_low_s16(vreinterpretq_s16_u16(vmovl_u8(vcreate_u8((uint64_t)px)))), k[x]);
      }
      s16 = vqmovn_s32(vshlq_s32(acc, shift)); /* arithmetic >> prec, saturated to int16 */
      px = vget_lane_u32(vreinterpret_u32_u8(vqmovun_s16(vcombine_s16(s16, s16))), 0);
      memcpy(o + (size_t)xx * 4, &px, 4);
    }
  }
}

/* The vertical pass, 8 pixels at a time: vld4 splits 32 bytes of RGBX into R, G, B (X is dropped)
 * and vst3 writes exactly 24 bytes of RGB; returns the first pixel it left to the scalar code. */
static int ie_vertical_neon(const unsigned char *tmp, int w, int out_h, int kpad, const int16_t *kk,
                            const int *bounds, int prec, unsigned char *dst, long dst_stride)
{
  const int32x4_t half = vdupq_n_s32(1 << (prec - 1)), shift = vdupq_n_s32(-prec);
  size_t n4 = (size_t)w * 4;
  int yy, y, i, c, stop = (w / 8) * 8;

  for (yy = 0; yy < out_h; yy++) {
    const int16_t *k = kk + yy * kpad;
    const unsigned char *base = tmp + (size_t)bounds[yy * 2] * n4;
    int n = bounds[yy * 2 + 1];
    unsigned char *o = dst + (long)yy * dst_stride;

    for (i = 0; i < stop; i += 8) {
      int32x4_t lo[3] = { half, half, half }, hi[3] = { half, half, half };
      const unsigned char *col = base + (size_t)i * 4;
      uint8x8x3_t rgb;

      for (y = 0; y < n; y++) {
        uint8x8x4_t px = vld4_u8(col + (size_t)y * n4);

        for (c = 0; c < 3; c++) {
          int16x8_t v = vreinterpretq_s16_u16(vmovl_u8(px.val[c]));

          lo[c] = vmlal_n_s16(lo[c], vget_low_s16(v), k[y]);
          hi[c] = vmlal_n_s16(hi[c], vget_high_s16(v), k[y]);
        }
      }
      for (c = 0; c < 3; c++)
        rgb.val[c] = vqmovun_s16(vcombine_s16(vqmovn_s32(vshlq_s32(lo[c], shift)),
                                              vqmovn_s32(vshlq_s32(hi[c], shift))));
      vst3_u8(o + (size_t)i * 3, rgb);
    }
  }
  return stop;
}
#endif

/*
 * Resize the box (bx0, by0)-(bx1, by1) of the window the decode left in work (its first window_bytes
 * of work_size bytes; got as ie_decode() returns it) to out_w x out_h with the filter f, and write
 * RGB to dst (rows dst_stride bytes apart). The rest of work holds the horizontal pass: out_w * 4
 * bytes for each window row the vertical pass reads.
 */
static int ie_resize_box(unsigned char *work, size_t window_bytes, size_t work_size, const int *got, double bx0,
                         double by0, double bx1, double by1, int out_w, int out_h, const struct ie_filter *flt,
                         int flags, unsigned char *dst, long dst_stride, char *msg, int msglen)
{
  const struct ie_filter f = *flt;
  float box[4];
  int kh, kv, ph, pv, prec_h, prec_v, rc, first, last, i, win_w, win_h, x_from = 0, vec = 0;
  int16_t *k_h = NULL, *k_v = NULL;
  int *b_h = NULL, *b_v = NULL;
  double *w_tmp = NULL, *wn_h = NULL, *wn_v = NULL;
  unsigned char *tmp;

  win_w = got[1];
  win_h = got[5];
  /* the box in the window's coordinates, as single-precision floats (Pillow's box type) */
  box[0] = (float)(bx0 - got[0]);
  box[1] = (float)(by0 - got[4]);
  box[2] = (float)(bx1 - got[0]);
  box[3] = (float)(by1 - got[4]);
  kh = ie_ksize(box[0], box[2], out_w, &f);
  kv = ie_ksize(box[1], box[3], out_h, &f);
  ph = (kh + 1) & ~1; /* taps padded to pairs */
  pv = (kv + 1) & ~1;
  k_h = (int16_t *)malloc(sizeof(int16_t) * (size_t)out_w * (size_t)ph);
  k_v = (int16_t *)malloc(sizeof(int16_t) * (size_t)out_h * (size_t)pv);
  b_h = (int *)malloc(sizeof(int) * 2 * (size_t)out_w);
  b_v = (int *)malloc(sizeof(int) * 2 * (size_t)out_h);
  w_tmp = (double *)malloc(sizeof(double) * (size_t)(kh > kv ? kh : kv));
  wn_h = (double *)malloc(sizeof(double) * (size_t)out_w * (size_t)kh);
  wn_v = (double *)malloc(sizeof(double) * (size_t)out_h * (size_t)kv);
  if (!k_h || !k_v || !b_h || !b_v || !w_tmp || !wn_h || !wn_v) {
    rc = IE_BAD_ARGS;
    ie_set_message(msg, msglen, "out of memory");
    goto done;
  }
  ie_coeffs(win_w, box[0], box[2], out_w, &f, kh, b_h, w_tmp, wn_h);
  ie_coeffs(win_h, box[1], box[3], out_h, &f, kv, b_v, w_tmp, wn_v);
  prec_h = ie_precision(wn_h, out_w * kh);
  prec_v = ie_precision(wn_v, out_h * kv);
  if (prec_h < 1 || prec_v < 1) {
    rc = IE_BAD_ARGS;
    ie_set_message(msg, msglen, "filter weights out of range");
    goto done;
  }
  ie_weights16(wn_h, out_w, kh, ph, prec_h, k_h);
  ie_weights16(wn_v, out_h, kv, pv, prec_v, k_v);
  /* the horizontal pass covers only the rows the vertical pass reads */
  first = b_v[0];
  last = b_v[(out_h - 1) * 2] + b_v[(out_h - 1) * 2 + 1];
  if (last > win_h || first < 0) {
    rc = IE_BAD_ARGS;
    ie_set_message(msg, msglen, "the box reaches outside the window");
    goto done;
  }
  if ((size_t)out_w * (size_t)(last - first) * 4 > work_size - window_bytes) {
    rc = IE_BAD_ARGS;
    ie_set_message(msg, msglen, "work buffer too small for the resize");
    goto done;
  }
  for (i = 0; i < out_h; i++)
    b_v[i * 2] -= first;
  tmp = work + window_bytes;
#if IE_SSE41
  /* the vector horizontal passes read up to ph pixels from each output pixel's first input: they
   * must stay inside the window's buffer (the weights of those past the taps are zero) */
  size_t reach = ((size_t)(last - 1) * (size_t)win_w + (size_t)b_h[(out_w - 1) * 2] + (size_t)ph) * 4;
  if (!(flags & IE_SCALAR))
    vec = __builtin_cpu_supports("avx2") ? 2 : (__builtin_cpu_supports("sse4.1") ? 1 : 0);
  if (vec == 2 && reach <= window_bytes)
    ie_horizontal_avx2(work, win_w, first, last - first, tmp, out_w, ph, k_h, b_h, prec_h);
  else if (vec == 1 && reach <= window_bytes)
    ie_horizontal_sse41(work, win_w, first, last - first, tmp, out_w, ph, k_h, b_h, prec_h);
  else
#elif IE_NEON
  if (!(flags & IE_SCALAR))
    vec = 3;
  if (vec == 3)
    ie_horizontal_neon(work, win_w, first, last - first, tmp, out_w, ph, k_h, b_h, prec_h);
  else
#endif
    ie_horizontal(work, win_w, first, last - first, tmp, out_w, ph, k_h, b_h, prec_h);
#if IE_SSE41
  if (vec == 2)
    x_from = ie_vertical_avx2(tmp, out_w, out_h, pv, k_v, b_v, prec_v, dst, dst_stride);
  else if (vec == 1)
    x_from = ie_vertical_sse41(tmp, out_w, out_h, pv, k_v, b_v, prec_v, dst, dst_stride);
#elif IE_NEON
  if (vec == 3)
    x_from = ie_vertical_neon(tmp, out_w, out_h, pv, k_v, b_v, prec_v, dst, dst_stride);
#endif
  ie_vertical(tmp, out_w, out_h, x_from, pv, k_v, b_v, prec_v, dst, dst_stride); /* what is left */
  rc = IE_OK;
done:
  free(k_h);
  free(k_v);
  free(b_h);
  free(b_v);
  free(w_tmp);
  free(wn_h);
  free(wn_v);
  return rc;
}

/* ------------------------------------------------------------------------------------------------
 * Fast mode in one call (decode.py's _fast_jpeg with _fast_jpeg_region): the header is read once,
 * and the geometry that Python would compute between two calls is done here, the same arithmetic
 * as preprocess/geometry.py (torchvision's) and decode.py's _dct_scale and _crop_window; the tests
 * hold the two paths to the same pixels.
 */

/* Pixels added around what the filter reads (decode.py's _MARGIN). */
#define IE_MARGIN 3

struct ie_fast {
  struct ie_plan plan; /* first: ie_decode_at's plan */
  int resize_short, resize_w, resize_h, crop_w, crop_h;
  double support;
  long long max_pixels, max_resized; /* limits: none where <= 0 and < 0 */
  unsigned char *work;
  unsigned long work_size;
  /* filled by ie_fast_plan */
  int scaled_w, scaled_h, src_w, src_h, dst_x, dst_y;
  double box[4];
  unsigned long needed;
};

/* The start of a centre crop along one axis, negative where it is padded (geometry.py's
 * _crop_start: int(round((size - crop) / 2.0)), halves to the even integer). */
static int ie_crop_start(int size, int crop)
{
  int d;

  if (crop > size)
    return -((crop - size) / 2);
  d = size - crop;
  if (d % 2 == 0)
    return d / 2;
  return (d / 2) % 2 == 0 ? d / 2 : d / 2 + 1;
}

static int ie_fast_plan(struct ie_plan *plan, int width, int height)
{
  struct ie_fast *f = (struct ie_fast *)(void *)plan;
  long long sw, sh;
  int scale, fit, left, top, right, bottom, x0, y0, x1, y1;
  double fx, fy, rx = 0.0, ry = 0.0;
  size_t window_bytes;

  if (width < 1 || height < 1 || (f->max_pixels > 0 && (long long)width * height > f->max_pixels))
    return IE_UNSUPPORTED; /* Pillow's checks give the reason */
  if (f->resize_short > 0) { /* resized_size: the shorter side, the longer one int(req * long / short) */
    if (width <= height) {
      sw = f->resize_short;
      sh = (long long)((double)((long long)f->resize_short * height) / (double)width);
    } else {
      sh = f->resize_short;
      sw = (long long)((double)((long long)f->resize_short * width) / (double)height);
    }
  } else {
    sw = f->resize_w;
    sh = f->resize_h;
  }
  if (sw < 1 || sh < 1 || sw > INT_MAX || sh > INT_MAX || (f->max_resized >= 0 && sw * sh > f->max_resized))
    return IE_UNSUPPORTED; /* a resize bomb: Python fails it with its reason */
  fit = width / (int)sw < height / (int)sh ? width / (int)sw : height / (int)sh;
  scale = fit >= 8 ? 8 : (fit >= 4 ? 4 : (fit >= 2 ? 2 : 1)); /* _dct_scale */
  f->scaled_w = (width + scale - 1) / scale;
  f->scaled_h = (height + scale - 1) / scale;
  /* crop_placement on the resized image */
  left = ie_crop_start((int)sw, f->crop_w);
  top = ie_crop_start((int)sh, f->crop_h);
  right = left + f->crop_w;
  bottom = top + f->crop_h;
  f->dst_x = left < 0 ? -left : 0;
  f->dst_y = top < 0 ? -top : 0;
  left = left < 0 ? 0 : left;
  top = top < 0 ? 0 : top;
  right = right > (int)sw ? (int)sw : right;
  bottom = bottom > (int)sh ? (int)sh : bottom;
  f->src_w = right - left;
  f->src_h = bottom - top;
  /* _crop_window: the crop's box in the decoded image, and the window its resize reads */
  if (f->scaled_w == sw && f->scaled_h == sh) {
    f->box[0] = left;
    f->box[1] = top;
    f->box[2] = right;
    f->box[3] = bottom;
  } else {
    fx = (double)width / (double)sw / (double)scale;
    fy = (double)height / (double)sh / (double)scale;
    f->box[0] = left * fx;
    f->box[1] = top * fy;
    f->box[2] = right * fx;
    f->box[3] = bottom * fy;
    rx = f->support * (fx > 1.0 ? fx : 1.0);
    ry = f->support * (fy > 1.0 ? fy : 1.0);
  }
  x0 = (int)floor(f->box[0] - rx) - IE_MARGIN;
  y0 = (int)floor(f->box[1] - ry) - IE_MARGIN;
  x1 = (int)ceil(f->box[2] + rx) + IE_MARGIN;
  y1 = (int)ceil(f->box[3] + ry) + IE_MARGIN;
  x0 = x0 < 0 ? 0 : x0;
  y0 = y0 < 0 ? 0 : y0;
  x1 = x1 > f->scaled_w ? f->scaled_w : x1;
  y1 = y1 > f->scaled_h ? f->scaled_h : y1;
  if (x1 <= x0 || y1 <= y0 || f->src_w < 1 || f->src_h < 1)
    return IE_UNSUPPORTED;
  window_bytes = ie_window_bytes(x1 - x0, y1 - y0);
  f->needed = (unsigned long)(window_bytes + (size_t)f->src_w * (size_t)(y1 - y0 + 64) * 4);
  if (f->needed > f->work_size)
    return IE_NEED_WORK;
  plan->denom = scale;
  plan->x0 = x0;
  plan->y0 = y0;
  plan->w = x1 - x0;
  plan->h = y1 - y0;
  plan->out = f->work;
  plan->out_size = (unsigned long)window_bytes;
  return IE_OK;
}

/*
 * Fast mode's preprocessing of one JPEG: Resize(resize_short) (or exactly resize_w x resize_h when
 * resize_short is 0) then CenterCrop(crop_h, crop_w), torchvision's geometry, decoded at the DCT
 * scale and over the window decode.py picks, the crop's box resized with the Pillow filter `filter`
 * (not NEAREST) and written as RGB into dst (crop_h rows dst_stride bytes apart, zeros where the
 * crop is larger than the resized image). max_pixels, max_resized: limits on the image's pixels (none
 * where <= 0, as Python's falsy limit) and on the resized image's (none where < 0). info[0], info[1]: the scaled image's size; info[2]: the work
 * bytes needed.
 *
 * IE_NEED_WORK: work is smaller than info[2] bytes (nothing written: call again with more).
 * IE_UNSUPPORTED: a colour space, size or limit that Python's path must take (it gives the
 * reasons). IE_JPEG_ERROR: libjpeg refused or warned. Then dst may be partly written.
 */
int ie_fast_crop(const unsigned char *data, unsigned long size, int resize_short, int resize_w, int resize_h,
                 int crop_w, int crop_h, int filter, int flags, long long max_pixels, long long max_resized,
                 unsigned char *dst, long dst_stride, unsigned char *work, unsigned long work_size, int *info,
                 char *msg, int msglen)
{
  struct ie_filter flt;
  struct ie_fast f;
  int got[6], rc, y;

  if (!ie_pick_filter(filter, &flt) || crop_w < 1 || crop_h < 1 || dst_stride < (long)crop_w * 3 ||
      (resize_short < 1 && (resize_w < 1 || resize_h < 1))) {
    ie_set_message(msg, msglen, "bad filter, crop or resize");
    return IE_BAD_ARGS;
  }
  memset(&f, 0, sizeof(f));
  f.plan.fn = ie_fast_plan;
  f.resize_short = resize_short;
  f.resize_w = resize_w;
  f.resize_h = resize_h;
  f.crop_w = crop_w;
  f.crop_h = crop_h;
  f.support = flt.support;
  f.max_pixels = max_pixels;
  f.max_resized = max_resized;
  f.work = work;
  f.work_size = work_size;
  rc = ie_decode_at(data, size, 1, flags, 0, 0, 1, 1, NULL, 0, 0, got, msg, msglen, &f.plan);
  info[0] = f.scaled_w;
  info[1] = f.scaled_h;
  info[2] = (int)(f.needed < INT_MAX ? f.needed : INT_MAX);
  if (rc == IE_NEED_WORK)
    ie_set_message(msg, msglen, "work buffer too small");
  else if (rc == IE_UNSUPPORTED && f.scaled_w == 0)
    ie_set_message(msg, msglen, "size or limit for the Python path");
  if (rc != IE_OK)
    return rc;
  if (got[2] != f.scaled_w || got[3] != f.scaled_h) {
    ie_set_message(msg, msglen, "not the scale asked for");
    return IE_UNSUPPORTED;
  }
  if (flags & IE_DECODE_ONLY)
    return IE_OK;
  if (f.src_w != crop_w || f.src_h != crop_h) /* the crop is larger than the image: zeros around */
    for (y = 0; y < crop_h; y++)
      memset(dst + (long)y * dst_stride, 0, (size_t)crop_w * 3);
  return ie_resize_box(work, (size_t)f.plan.out_size, (size_t)work_size, got, f.box[0], f.box[1], f.box[2],
                       f.box[3], f.src_w, f.src_h, &flt, flags, dst + (long)f.dst_y * dst_stride + (long)f.dst_x * 3,
                       dst_stride, msg, msglen);
}
