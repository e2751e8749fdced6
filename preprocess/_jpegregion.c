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
 * scripts/setup-env.sh or `python -m preprocess.jpegregion --build`:
 *
 *     cc -O2 -shared -fPIC -o _jpegregion-<platform>.so _jpegregion.c -ljpeg
 *
 * Strict, as simplejpeg's strict mode and TurboJPEG's TJFLAG_STOPONWARNING: a libjpeg warning
 * (corrupt data libjpeg would paper over, a premature end of file) is an error, and the caller
 * then hands the file to Pillow, which decodes it or fails it with exact mode's reason. To see
 * such damage anywhere in the file the rows after the window are entropy-decoded too (skipped
 * to the last row, which is read), and the decoder is finished up to the EOI marker.
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
#define IE_ABI 4

/* Return codes */
#define IE_OK 0
#define IE_UNSUPPORTED 1 /* not a colour space we convert like Pillow (CMYK, YCCK, ...) */
#define IE_JPEG_ERROR 2  /* libjpeg error or warning; the message is in msg */
#define IE_BAD_ARGS 3    /* the caller's region or buffer does not fit; the message is in msg */

/* Flags */
#define IE_FASTDCT 1      /* JDCT_IFAST instead of the accurate JDCT_ISLOW */
#define IE_FASTUPSAMPLE 2 /* no fancy (triangle-filter) chroma upsampling */
#define IE_MIN_CROP 32 /* narrowest window decoded (pixels) */

#define IE_SCALAR 8       /* resize with the scalar code even where SSE4.1 is there (tests) */

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
static int ie_decode_at(const unsigned char *data, unsigned long size, int denom, int flags, int x0, int y0,
                       int w, int h, unsigned char *out, unsigned long out_size, size_t placed_stride, int *got,
                       char *msg, int msglen);

int ie_decode(const unsigned char *data, unsigned long size, int denom, int flags, int x0, int y0, int w,
              int h, unsigned char *out, unsigned long out_size, int *got, char *msg, int msglen)
{
  return ie_decode_at(data, size, denom, flags, x0, y0, w, h, out, out_size, 0, got, msg, msglen);
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
                      msglen);
}

/* placed_stride 0: the window packed at out (ie_decode); else placed in the image (ie_decode_placed) */
static int ie_decode_at(const unsigned char *data, unsigned long size, int denom, int flags, int x0, int y0,
                       int w, int h, unsigned char *out, unsigned long out_size, size_t placed_stride, int *got,
                       char *msg, int msglen)
{
  struct jpeg_decompress_struct cinfo;
  struct ie_error err;
  JDIMENSION xoff, width, imcu, start, stop, skip;
  JSAMPROW rows[16];
  size_t stride;
  int i, n;

  if (denom != 1 && denom != 2 && denom != 4 && denom != 8) {
    ie_set_message(msg, msglen, "denom must be 1, 2, 4 or 8");
    return IE_BAD_ARGS;
  }
  if (x0 < 0 || y0 < 0 || w < 1 || h < 1) {
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
  cinfo.out_color_space = JCS_EXT_RGBX;
  cinfo.scale_num = 1;
  cinfo.scale_denom = (unsigned int)denom;
  cinfo.dct_method = (flags & IE_FASTDCT) ? JDCT_IFAST : JDCT_ISLOW;
  cinfo.do_fancy_upsampling = (flags & IE_FASTUPSAMPLE) ? FALSE : TRUE;
  jpeg_calc_output_dimensions(&cinfo);
  got[2] = (int)cinfo.output_width;
  got[3] = (int)cinfo.output_height;
  if ((JDIMENSION)x0 + (JDIMENSION)w > cinfo.output_width ||
      (JDIMENSION)y0 + (JDIMENSION)h > cinfo.output_height) {
    jpeg_destroy_decompress(&cinfo);
    ie_set_message(msg, msglen, "region outside the scaled image");
    return IE_BAD_ARGS;
  }
  if (placed_stride ? (placed_stride < (size_t)cinfo.output_width * 4 ||
                       placed_stride * cinfo.output_height > out_size)
                    : ie_window_bytes(w, h) > out_size) {
    jpeg_destroy_decompress(&cinfo);
    ie_set_message(msg, msglen, "output buffer too small");
    return IE_BAD_ARGS;
  }
  jpeg_start_decompress(&cinfo);
  xoff = (JDIMENSION)x0;
  width = (JDIMENSION)w;
  if (width < IE_MIN_CROP) {
    /* libjpeg-turbo's fancy upsampling is wrong inside windows 1 or 2 pixels wide (the whole
     * window is its edge): no window narrower than IE_MIN_CROP */
    xoff = xoff > (IE_MIN_CROP - width) / 2 ? xoff - (IE_MIN_CROP - width) / 2 : 0;
    width = IE_MIN_CROP;
    if (xoff + width > cinfo.output_width) {
      width = cinfo.output_width < IE_MIN_CROP ? cinfo.output_width : IE_MIN_CROP;
      xoff = cinfo.output_width - width;
    }
  }
  if (width < cinfo.output_width)
    jpeg_crop_scanline(&cinfo, &xoff, &width);
  got[0] = (int)xoff;
  got[1] = (int)width;
  stride = (size_t)width * 4;
#if JPEG_LIB_VERSION >= 70
  imcu = (JDIMENSION)(cinfo.max_v_samp_factor * cinfo.min_DCT_v_scaled_size);
#else
  imcu = (JDIMENSION)(cinfo.max_v_samp_factor * cinfo.min_DCT_scaled_size);
#endif
  if (imcu < 1)
    imcu = 1;
  start = ((JDIMENSION)y0 / imcu) * imcu;
  stop = (((JDIMENSION)(y0 + h) + imcu - 1) / imcu) * imcu;
  if (stop > cinfo.output_height)
    stop = cinfo.output_height;
  got[4] = (int)start;
  got[5] = (int)(stop - start);
  if (start > 0 && jpeg_skip_scanlines(&cinfo, start) != start) {
    jpeg_destroy_decompress(&cinfo);
    ie_set_message(msg, msglen, "could not skip to the region");
    return IE_JPEG_ERROR;
  }
  while (cinfo.output_scanline < stop) {
    n = (int)(stop - cinfo.output_scanline);
    if (n > 16)
      n = 16;
    for (i = 0; i < n; i++)
      rows[i] = placed_stride
                    ? out + (size_t)(cinfo.output_scanline + (JDIMENSION)i) * placed_stride + (size_t)xoff * 4
                    : out + (size_t)(cinfo.output_scanline - start + (JDIMENSION)i) * stride;
    if (jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)n) == 0)
      goto no_rows;
  }
  if (cinfo.output_scanline < cinfo.output_height) {
    /* The rows below the window: entropy-decoded only (skipping to the very end would not read
     * them at all), then the last row is read, so that damage anywhere in the file is seen. */
    skip = cinfo.output_height - cinfo.output_scanline - 1;
    if (skip > 0 && jpeg_skip_scanlines(&cinfo, skip) != skip) {
      jpeg_destroy_decompress(&cinfo);
      ie_set_message(msg, msglen, "could not skip past the region");
      return IE_JPEG_ERROR;
    }
    rows[0] = (JSAMPROW)(*cinfo.mem->alloc_large)((j_common_ptr)&cinfo, JPOOL_IMAGE, stride);
    while (cinfo.output_scanline < cinfo.output_height)
      if (jpeg_read_scanlines(&cinfo, rows, 1) == 0)
        goto no_rows;
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return IE_OK;
no_rows: /* never seen from an in-memory source; rather than loop, Pillow takes the file */
  jpeg_destroy_decompress(&cinfo);
  ie_set_message(msg, msglen, "libjpeg returned no rows");
  return IE_JPEG_ERROR;
}

/* ------------------------------------------------------------------------------------------------
 * Resize of the crop's box, written as RGB: Pillow's Image.resize(size, filter, box) arithmetic
 * (stock Pillow's src/libImaging/Resample.c, 8 bits per channel): per output pixel, filter weights
 * in double precision from the box given as single-precision floats, normalised, rounded to fixed
 * point with 22 fractional bits; a horizontal pass over the rows the vertical pass reads, rounded
 * to 8 bits, then the vertical pass. Pillow-SIMD rounds its weights differently (at most 1 apart).
 * Doing it here spares fast mode Pillow's image objects and the RGBX -> RGB repacking per image.
 */

#define IE_PRECISION_BITS (32 - 8 - 2)

/* The vertical pass is compiled for AVX2 and for the baseline, picked at load time by the CPU
 * (GCC's function multi-versioning), and the horizontal pass has an SSE4.1 version picked at run
 * time: one build runs on any x86-64 and uses the vector units where they are. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(IE_NO_CLONES)
#define IE_CLONES __attribute__((target_clones("avx2", "default")))
#define IE_SSE41 1
#include <immintrin.h>
#else
#define IE_CLONES
#define IE_SSE41 0
#endif

/* Fractional bits of the horizontal pass's 16-bit weights (vector path): pairs of taps are
 * multiplied and added in one instruction (pmaddwd), as Pillow-SIMD does. */
#define IE_H16_BITS 14

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

/* Fixed-point weights k[out_size * ksize] and bounds[out_size * 2] (first input, count); the
 * normalised weights themselves into wn[out_size * ksize] when wn is not NULL. w: ksize doubles of
 * scratch. */
static void ie_coeffs(int in_size, float in0, float in1, int out_size, const struct ie_filter *f,
                      int ksize, int32_t *k, int *bounds, double *w, double *wn)
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
    for (x = 0; x < ksize; x++) {
      double v = x < xmax ? (ww != 0.0 ? w[x] / ww : w[x]) : 0.0;

      k[xx * ksize + x] = (int32_t)(v < 0 ? -0.5 + v * (1 << IE_PRECISION_BITS)
                                          : 0.5 + v * (1 << IE_PRECISION_BITS));
      if (wn != NULL)
        wn[xx * ksize + x] = v;
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
}

static inline unsigned char ie_clip8(int32_t v)
{
  v >>= IE_PRECISION_BITS;
  return (unsigned char)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

/* RGBX rows [first, first + rows) of src (width src_w) -> RGBX tmp (out_w wide), horizontally. */
static void ie_horizontal(const unsigned char *src, int src_w, int first, int rows, unsigned char *tmp,
                          int out_w, int ksize, const int32_t *kk, const int *bounds)
{
  int yy, xx, x, c;

  for (yy = 0; yy < rows; yy++) {
    const unsigned char *row = src + (size_t)(first + yy) * (size_t)src_w * 4;
    unsigned char *o = tmp + (size_t)yy * (size_t)out_w * 4;

    for (xx = 0; xx < out_w; xx++) {
      const unsigned char *p = row + (size_t)bounds[xx * 2] * 4;
      const int32_t *k = kk + xx * ksize;
      int n = bounds[xx * 2 + 1];
      int32_t ss[4] = { 1 << (IE_PRECISION_BITS - 1), 1 << (IE_PRECISION_BITS - 1),
                        1 << (IE_PRECISION_BITS - 1), 1 << (IE_PRECISION_BITS - 1) };

      for (x = 0; x < n; x++)
        for (c = 0; c < 4; c++)
          ss[c] += p[x * 4 + c] * k[x];
      for (c = 0; c < 4; c++)
        o[xx * 4 + c] = ie_clip8(ss[c]);
    }
  }
}

#if IE_SSE41
/* The same pass with SSE4.1: weights as int16 pairs kp[xx * pairs + j] = (k[2j + 1] << 16) | k[2j]
 * with IE_H16_BITS fractional bits, zero past each pixel's taps; two taps (two RGBX pixels) per
 * multiply-add. An odd number of taps reads one pixel more (its weight is zero): up to 2 * pairs
 * pixels are read from an output pixel's first input, which the caller keeps readable. */
__attribute__((target("sse4.1"))) static void ie_horizontal_sse41(
    const unsigned char *src, int src_w, int first, int rows, unsigned char *tmp, int out_w, int pairs,
    const int32_t *kp, const int *bounds)
{
  /* bytes of two pixels p0 p1 -> int16 lanes p0.r p1.r p0.g p1.g p0.b p1.b p0.x p1.x */
  const __m128i order = _mm_setr_epi8(0, -1, 4, -1, 1, -1, 5, -1, 2, -1, 6, -1, 3, -1, 7, -1);
  const __m128i half = _mm_set1_epi32(1 << (IE_H16_BITS - 1));
  int yy, xx, j;

  for (yy = 0; yy < rows; yy++) {
    const unsigned char *row = src + (size_t)(first + yy) * (size_t)src_w * 4;
    int32_t *o = (int32_t *)(void *)(tmp + (size_t)yy * (size_t)out_w * 4);

    for (xx = 0; xx < out_w; xx++) {
      const unsigned char *p = row + (size_t)bounds[xx * 2] * 4;
      const int32_t *k = kp + xx * pairs;
      int n = (bounds[xx * 2 + 1] + 1) / 2;
      __m128i acc = half, pix;

      for (j = 0; j < n; j++) {
        pix = _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)(const void *)(p + 8 * j)), order);
        acc = _mm_add_epi32(acc, _mm_madd_epi16(pix, _mm_set1_epi32(k[j])));
      }
      acc = _mm_srai_epi32(acc, IE_H16_BITS);
      acc = _mm_packus_epi16(_mm_packs_epi32(acc, acc), acc);
      o[xx] = _mm_cvtsi128_si32(acc);
    }
  }
}

/* True when every weight fits the int16 lanes with IE_H16_BITS fractional bits. */
static int ie_fits16(const double *w, int n)
{
  int i;

  for (i = 0; i < n; i++)
    if (fabs(w[i]) * (1 << IE_H16_BITS) > 32000.0)
      return 0;
  return 1;
}

/* The int16 weight pairs of ie_horizontal_sse41 from the double weights w[out_w * ksize]. */
static void ie_pairs16(const double *w, int out_w, int ksize, int pairs, int32_t *kp)
{
  int xx, j;

  for (xx = 0; xx < out_w; xx++) {
    for (j = 0; j < pairs; j++) {
      double a = 2 * j < ksize ? w[xx * ksize + 2 * j] : 0.0;
      double b = 2 * j + 1 < ksize ? w[xx * ksize + 2 * j + 1] : 0.0;
      int32_t ia = (int32_t)lround(a * (1 << IE_H16_BITS));
      int32_t ib = (int32_t)lround(b * (1 << IE_H16_BITS));

      kp[xx * pairs + j] = (int32_t)(((uint32_t)(uint16_t)(int16_t)ib << 16) | (uint16_t)(int16_t)ia);
    }
  }
}
#endif

/* RGBX tmp (width w) -> RGB rows of dst, vertically; acc: w * 4 int32 of scratch. */
IE_CLONES static void ie_vertical(const unsigned char *tmp, int w, int out_h, int ksize, const int32_t *kk,
                        const int *bounds, unsigned char *dst, long dst_stride, int32_t *acc)
{
  int yy, y, i, n4 = w * 4;

  for (yy = 0; yy < out_h; yy++) {
    const int32_t *k = kk + yy * ksize;
    const unsigned char *base = tmp + (size_t)bounds[yy * 2] * (size_t)n4;
    int n = bounds[yy * 2 + 1];
    unsigned char *o = dst + (long)yy * dst_stride;

    for (i = 0; i < n4; i++)
      acc[i] = 1 << (IE_PRECISION_BITS - 1);
    for (y = 0; y < n; y++) {
      const unsigned char *r = base + (size_t)y * (size_t)n4;
      int32_t ky = k[y];

      for (i = 0; i < n4; i++)
        acc[i] += r[i] * ky;
    }
    for (i = 0; i < w; i++) {
      o[i * 3 + 0] = ie_clip8(acc[i * 4 + 0]);
      o[i * 3 + 1] = ie_clip8(acc[i * 4 + 1]);
      o[i * 3 + 2] = ie_clip8(acc[i * 4 + 2]);
    }
  }
}

/*
 * Decode the window [x0, x0 + w) x [y0, y0 + h) as ie_decode() does, into work, then resize the box
 * (bx0, by0)-(bx1, by1) of the scaled image (it must lie within the window with the filter's
 * reach) to out_w x out_h with the Pillow filter `filter`, and write RGB to dst (rows dst_stride
 * bytes apart). work must hold (w + 32) * (h + 64) * 4 + out_w * (h + 64) * 4 bytes. got as for
 * ie_decode(). IE_BAD_ARGS for an unknown filter (NEAREST is not a resampling filter in Pillow).
 */
int ie_decode_resize(const unsigned char *data, unsigned long size, int denom, int flags, int x0, int y0,
                     int w, int h, double bx0, double by0, double bx1, double by1, int out_w, int out_h,
                     int filter, unsigned char *dst, long dst_stride, unsigned char *work,
                     unsigned long work_size, int *got, char *msg, int msglen)
{
  struct ie_filter f;
  size_t window_bytes = ie_window_bytes(w, h);
  float box[4];
  int kh, kv, rc, first, last, i, win_w, win_h;
  int32_t *kk_h = NULL, *kk_v = NULL, *acc = NULL, *kp = NULL;
  int *b_h = NULL, *b_v = NULL, pairs;
  size_t reach;
  double *w_tmp = NULL, *wn = NULL;
  unsigned char *tmp;

  if (!ie_pick_filter(filter, &f)) {
    ie_set_message(msg, msglen, "unsupported resampling filter");
    return IE_BAD_ARGS;
  }
  if (out_w < 1 || out_h < 1 || w < 1 || h < 1 ||
      window_bytes + (size_t)out_w * (size_t)(h + 64) * 4 > work_size) {
    ie_set_message(msg, msglen, "work buffer too small or empty output");
    return IE_BAD_ARGS;
  }
  rc = ie_decode(data, size, denom, flags, x0, y0, w, h, work, (unsigned long)window_bytes, got, msg, msglen);
  if (rc != IE_OK)
    return rc;
  win_w = got[1];
  win_h = got[5];
  /* the box in the window's coordinates, as single-precision floats (Pillow's box type) */
  box[0] = (float)(bx0 - got[0]);
  box[1] = (float)(by0 - got[4]);
  box[2] = (float)(bx1 - got[0]);
  box[3] = (float)(by1 - got[4]);
  kh = ie_ksize(box[0], box[2], out_w, &f);
  kv = ie_ksize(box[1], box[3], out_h, &f);
  pairs = (kh + 1) / 2;
  kk_h = (int32_t *)malloc(sizeof(int32_t) * (size_t)out_w * (size_t)kh);
  kk_v = (int32_t *)malloc(sizeof(int32_t) * (size_t)out_h * (size_t)kv);
  b_h = (int *)malloc(sizeof(int) * 2 * (size_t)out_w);
  b_v = (int *)malloc(sizeof(int) * 2 * (size_t)out_h);
  w_tmp = (double *)malloc(sizeof(double) * (size_t)(kh > kv ? kh : kv));
  acc = (int32_t *)malloc(sizeof(int32_t) * 4 * (size_t)out_w);
  wn = (double *)malloc(sizeof(double) * (size_t)out_w * (size_t)kh);
  kp = (int32_t *)malloc(sizeof(int32_t) * (size_t)out_w * (size_t)pairs);
  if (!kk_h || !kk_v || !b_h || !b_v || !w_tmp || !acc || !wn || !kp) {
    rc = IE_BAD_ARGS;
    ie_set_message(msg, msglen, "out of memory");
    goto done;
  }
  ie_coeffs(win_w, box[0], box[2], out_w, &f, kh, kk_h, b_h, w_tmp, wn);
  ie_coeffs(win_h, box[1], box[3], out_h, &f, kv, kk_v, b_v, w_tmp, NULL);
  /* the horizontal pass covers only the rows the vertical pass reads */
  first = b_v[0];
  last = b_v[(out_h - 1) * 2] + b_v[(out_h - 1) * 2 + 1];
  if (last - first > h + 64 || last > win_h || first < 0) {
    rc = IE_BAD_ARGS;
    ie_set_message(msg, msglen, "the box reaches outside the window");
    goto done;
  }
  for (i = 0; i < out_h; i++)
    b_v[i * 2] -= first;
  tmp = work + window_bytes;
#if IE_SSE41
  /* the vector passes read up to 2 * pairs pixels from each output pixel's first input: they must
   * stay inside the window's buffer (the weights of those past the taps are zero) */
  reach = ((size_t)(last - 1) * (size_t)win_w + (size_t)b_h[(out_w - 1) * 2] + 2 * (size_t)pairs) * 4;
  if (!(flags & IE_SCALAR) && reach <= window_bytes && ie_fits16(wn, out_w * kh) &&
      __builtin_cpu_supports("sse4.1")) {
    ie_pairs16(wn, out_w, kh, pairs, kp);
    ie_horizontal_sse41(work, win_w, first, last - first, tmp, out_w, pairs, kp, b_h);
  } else
#endif
    ie_horizontal(work, win_w, first, last - first, tmp, out_w, kh, kk_h, b_h);
  ie_vertical(tmp, out_w, out_h, kv, kk_v, b_v, dst, dst_stride, acc);
  rc = IE_OK;
done:
  free(wn);
  free(kp);
  free(kk_h);
  free(kk_v);
  free(b_h);
  free(b_v);
  free(w_tmp);
  free(acc);
  return rc;
}
