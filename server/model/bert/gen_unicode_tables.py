#!/usr/bin/python3
"""Generates unicode_tables.inc: the Unicode data the WordPiece tokenizer needs (no ICU).

Run with Debian's /usr/bin/python3 (its unicodedata fixes the Unicode version, 14.0.0 on Debian 12):

    /usr/bin/python3 server/model/bert/gen_unicode_tables.py > server/model/bert/unicode_tables.inc

Tables (all sorted by code point, searched by binary search):
  kCharClassRanges   {lo, hi, class}: the code points the BERT basic tokenizer treats specially, as in the Hugging
                     Face `tokenizers` BertNormalizer / BertPreTokenizer:
                       kControl     Cc, Cf, Co except \\t \\n \\r (removed by clean_text; unassigned code points are
                                    kept, as the fast tokenizer does)
                       kWhitespace  \\t \\n \\r and Zs / Zl / Zp (Rust char::is_whitespace once controls are gone)
                       kPunctuation ASCII punctuation (33-47, 58-64, 91-96, 123-126) and every P* category
                       kMark        Mn (non-spacing marks; dropped when stripping accents)
                       kCjk         the CJK ideograph blocks BERT splits into single-character tokens
                     everything else is kOther.
  kLowerRuns         {lo, hi, delta, step}: simple lowercase mapping; for cp in [lo, hi] with (cp - lo) % step == 0
                     lower(cp) = cp + delta. The only multi-character lowercase (U+0130 -> i U+0307) is handled in code.
  kStripSingle       {cp, out}: the canonical decomposition (NFD) of cp with its non-spacing marks dropped, when
                     that is exactly one character (e.g. U+00C4 -> 'A', U+F900 -> U+8C48).
  kStripMulti        {cp, n, out[3]}: the same when it is two or three characters. (Characters whose
                     decomposition is all marks are Mn themselves and are dropped before any lookup.)
  kNonMarkCombining  {cp, ccc}: characters with a non-zero canonical combining class that are NOT Mn (they survive
                     accent stripping and take part in canonical reordering).
Hangul syllables decompose algorithmically (in code).
"""
import sys
import unicodedata as ud

CJK = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
       (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]
OTHER, CONTROL, WHITESPACE, PUNCTUATION, MARK, CJK_CLASS = range(6)
CLASS_NAMES = ["kOther", "kControl", "kWhitespace", "kPunctuation", "kMark", "kCjk"]
CLASS_SHORT = ["O", "C", "W", "P", "M", "J"]
MAX = 0x110000


def is_surrogate(c):
    return 0xD800 <= c <= 0xDFFF


def char_class(c):
    ch = chr(c)
    cat = ud.category(ch)
    if ch in "\t\n\r":
        return WHITESPACE
    if cat in ("Cc", "Cf", "Co"):
        return CONTROL
    if cat in ("Zs", "Zl", "Zp"):
        return WHITESPACE
    if any(lo <= c <= hi for lo, hi in CJK):
        return CJK_CLASS
    if 33 <= c <= 47 or 58 <= c <= 64 or 91 <= c <= 96 or 123 <= c <= 126 or cat.startswith("P"):
        return PUNCTUATION
    if cat == "Mn":
        return MARK
    return OTHER


def class_ranges():
    ranges = []
    prev = None
    for c in range(MAX):
        k = char_class(c)
        if ranges and k == prev and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c, k])
        prev = k
    return [r for r in ranges if r[2] != OTHER]


def lower_runs():
    pairs = []
    for c in range(MAX):
        if is_surrogate(c):
            continue
        low = chr(c).lower()
        if low == chr(c):
            continue
        if len(low) != 1:
            assert c == 0x130 and low == "i\u0307", (hex(c), low)
            continue
        pairs.append((c, ord(low) - c))
    runs = []  # [lo, hi, delta, step]
    for c, d in pairs:
        if runs:
            lo, hi, delta, step = runs[-1]
            if delta == d:
                if hi == lo and c - hi in (1, 2):
                    runs[-1] = [lo, c, d, c - hi]
                    continue
                if c - hi == step:
                    runs[-1][1] = c
                    continue
        runs.append([c, c, d, 1])
    # Self-check.
    for c in range(MAX):
        if is_surrogate(c) or c == 0x130:
            continue
        want = ord(chr(c).lower())
        got = c
        for lo, hi, delta, step in runs:
            if lo <= c <= hi and (c - lo) % step == 0:
                got = c + delta
                break
        assert got == want, hex(c)
    return runs


def strip_tables():
    single, multi = [], []
    for c in range(MAX):
        if is_surrogate(c) or 0xAC00 <= c <= 0xD7A3:
            continue
        d = ud.normalize("NFD", chr(c))
        if d == chr(c):
            continue
        kept = [ord(x) for x in d if ud.category(x) != "Mn"]
        if not kept:
            assert ud.category(chr(c)) == "Mn", hex(c)  # dropped as a mark before any lookup
            continue
        if len(kept) == 1:
            single.append((c, kept[0]))
        else:
            assert len(kept) <= 3, hex(c)
            multi.append((c, kept))
    return single, multi


def non_mark_combining():
    return [(c, ud.combining(chr(c))) for c in range(MAX)
            if not is_surrogate(c) and ud.combining(chr(c)) and ud.category(chr(c)) != "Mn"]


def emit_rows(out, rows, per_line):
    for i in range(0, len(rows), per_line):
        out.append("    " + " ".join(rows[i:i + per_line]))


def main():
    out = []
    out.append("// GENERATED by server/model/bert/gen_unicode_tables.py from Python %s unicodedata (Unicode %s)."
               % (sys.version.split()[0], ud.unidata_version))
    out.append("// Do not edit; rerun the script. Included by unicode_text.cc only.")
    out.append("")
    out.append("constexpr char kUnicodeVersion[] = \"%s\";" % ud.unidata_version)
    out.append("")
    ranges = class_ranges()
    out.append("// Short class names for the table below.")
    for short, name in zip(CLASS_SHORT[1:], CLASS_NAMES[1:]):
        out.append("constexpr CharClass %s = CharClass::%s;" % (short, name))
    out.append("constexpr ClassRange kCharClassRanges[] = {")
    emit_rows(out, ["{0x%X,0x%X,%s}," % (lo, hi, CLASS_SHORT[k]) for lo, hi, k in ranges], 8)
    out.append("};")
    out.append("")
    runs = lower_runs()
    out.append("constexpr LowerRun kLowerRuns[] = {")
    emit_rows(out, ["{0x%X, 0x%X, %d, %d}," % tuple(r) for r in runs], 4)
    out.append("};")
    out.append("")
    single, multi = strip_tables()
    out.append("constexpr StripSingle kStripSingle[] = {")
    emit_rows(out, ["{0x%X,0x%X}," % p for p in single], 10)
    out.append("};")
    out.append("")
    out.append("constexpr StripMulti kStripMulti[] = {")
    rows = []
    for c, kept in multi:
        padded = kept + [0] * (3 - len(kept))
        rows.append("{0x%X, %d, {0x%X, 0x%X, 0x%X}}," % (c, len(kept), *padded))
    emit_rows(out, rows, 3)
    out.append("};")
    out.append("")
    out.append("constexpr CombiningClass kNonMarkCombining[] = {")
    emit_rows(out, ["{0x%X, %d}," % p for p in non_mark_combining()], 6)
    out.append("};")
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
