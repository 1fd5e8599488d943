//! SMS encoding and segment counting (3GPP TS 23.038, "GSM 03.38").
//!
//! The provider does the actual encoding; Pushgate still needs to know which encoding a text
//! will travel in and how many parts it costs, because both go into the provider request (so
//! the provider can refuse a text it would have to mangle) and into the `sms_sent` event detail
//! (so the backend sees what it paid for). Counting is exact, not an estimate: a concatenated
//! SMS never splits an escape sequence (GSM-7) or a surrogate pair (UCS-2) across two parts,
//! so a part can end up one unit short of its nominal size.

use serde::Serialize;

/// Characters of the GSM 7-bit default alphabet (one septet each). The escape code 0x1B is
/// not listed: it only introduces the extension table.
const GSM_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";

/// Characters of the GSM 7-bit default alphabet extension table: each is sent as ESC plus one
/// septet, so it costs two.
const GSM_EXTENSION: &str = "\u{000C}^{}\\[~]|€";

/// Septets in a single GSM-7 SMS.
const GSM_SINGLE: usize = 160;
/// Septets per part of a concatenated GSM-7 SMS (the user data header takes the rest).
const GSM_PART: usize = 153;
/// UTF-16 code units in a single UCS-2 SMS.
const UCS2_SINGLE: usize = 70;
/// UTF-16 code units per part of a concatenated UCS-2 SMS.
const UCS2_PART: usize = 67;

/// The data coding an SMS travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Encoding {
    /// The GSM 7-bit default alphabet with its extension table.
    #[serde(rename = "GSM-7")]
    Gsm7,
    /// UCS-2 (UTF-16 code units; characters outside the BMP take two).
    #[serde(rename = "UCS-2")]
    Ucs2,
}

impl Encoding {
    /// The name used on the wire and in event details.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gsm7 => "GSM-7",
            Encoding::Ucs2 => "UCS-2",
        }
    }
}

/// How a text will be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmsShape {
    pub encoding: Encoding,
    /// Number of SMS parts (at least 1, even for an empty text: an empty SMS is still one).
    pub segments: usize,
    /// Length in encoding units: septets for GSM-7, UTF-16 code units for UCS-2.
    pub units: usize,
}

impl SmsShape {
    /// `"1 segment, GSM-7"`, `"3 segments, UCS-2"`: the start of the `sms_sent` detail.
    pub fn describe(&self) -> String {
        let noun = if self.segments == 1 {
            "segment"
        } else {
            "segments"
        };
        format!("{} {noun}, {}", self.segments, self.encoding.as_str())
    }
}

/// Septets a character costs in GSM-7, or `None` if GSM-7 cannot carry it.
fn gsm_cost(c: char) -> Option<usize> {
    if GSM_BASIC.contains(c) {
        Some(1)
    } else if GSM_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// Number of parts for a sequence of per-character costs, never splitting one character's
/// units across two parts.
fn count_parts(
    costs: impl Iterator<Item = usize> + Clone,
    single: usize,
    part: usize,
) -> (usize, usize) {
    let total: usize = costs.clone().sum();
    if total <= single {
        return (total, 1);
    }
    let mut parts = 1;
    let mut used = 0;
    for cost in costs {
        if used + cost > part {
            parts += 1;
            used = 0;
        }
        used += cost;
    }
    (total, parts)
}

/// Chooses the encoding for `text` (GSM-7 when every character is in the GSM 03.38 default
/// alphabet or its extension table, UCS-2 otherwise) and counts its parts.
pub fn shape(text: &str) -> SmsShape {
    let gsm: Option<Vec<usize>> = text.chars().map(gsm_cost).collect();
    match gsm {
        Some(costs) => {
            let (units, segments) = count_parts(costs.iter().copied(), GSM_SINGLE, GSM_PART);
            SmsShape {
                encoding: Encoding::Gsm7,
                segments,
                units,
            }
        }
        None => {
            let (units, segments) =
                count_parts(text.chars().map(char::len_utf16), UCS2_SINGLE, UCS2_PART);
            SmsShape {
                encoding: Encoding::Ucs2,
                segments,
                units,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gsm(n: usize, c: char) -> String {
        std::iter::repeat_n(c, n).collect()
    }

    #[test]
    fn plain_ascii_is_gsm7() {
        let s = shape("Your code is 1234.");
        assert_eq!(
            s,
            SmsShape {
                encoding: Encoding::Gsm7,
                segments: 1,
                units: 18
            }
        );
        assert_eq!(s.describe(), "1 segment, GSM-7");
    }

    #[test]
    fn gsm7_single_and_concatenated_limits() {
        assert_eq!(shape(&gsm(160, 'a')).segments, 1);
        assert_eq!(shape(&gsm(161, 'a')).segments, 2);
        assert_eq!(shape(&gsm(306, 'a')).segments, 2);
        assert_eq!(shape(&gsm(307, 'a')).segments, 3);
        assert_eq!(shape(&gsm(459, 'a')).segments, 3);
    }

    #[test]
    fn extension_characters_cost_two_septets() {
        let s = shape(&gsm(80, '€'));
        assert_eq!((s.encoding, s.units, s.segments), (Encoding::Gsm7, 160, 1));
        let s = shape(&gsm(81, '€'));
        assert_eq!((s.units, s.segments), (162, 2));
        for c in ['^', '{', '}', '\\', '[', ']', '~', '|', '\u{000C}'] {
            assert_eq!(shape(&c.to_string()).units, 2, "{c:?}");
        }
    }

    #[test]
    fn escape_sequences_are_not_split_across_parts() {
        // 152 plain septets then '€': the first part has room for one septet only, so the
        // two-septet character starts the second part
        let text = format!("{}€{}", gsm(152, 'a'), gsm(151, 'a'));
        let s = shape(&text);
        assert_eq!(s.units, 305);
        // naive ceil(305 / 153) = 2, but part one holds 152, part two '€' + 151 = 153
        assert_eq!(s.segments, 2);
        let text = format!("{}€{}", gsm(152, 'a'), gsm(152, 'a'));
        let s = shape(&text);
        assert_eq!(s.units, 306);
        // naive ceil(306 / 153) = 2, but the escape cannot straddle the boundary
        assert_eq!(s.segments, 3);
    }

    #[test]
    fn national_characters_of_the_default_alphabet_stay_gsm7() {
        let s = shape("Grüße aus Zürich, ÄÖÜ äöü ñ é à ø å Æ ß ¿¡ § £ ¥ ¤ Ç");
        assert_eq!(s.encoding, Encoding::Gsm7);
        let s = shape("ΔΦΓΛΩΠΨΣΘΞ_@$");
        assert_eq!(s.encoding, Encoding::Gsm7);
    }

    #[test]
    fn other_characters_force_ucs2() {
        assert_eq!(
            shape("café ç").encoding,
            Encoding::Ucs2,
            "lower-case ç is not in GSM 03.38"
        );
        assert_eq!(shape("`").encoding, Encoding::Ucs2);
        assert_eq!(shape("Привет").encoding, Encoding::Ucs2);
        assert_eq!(shape("ok 👍").encoding, Encoding::Ucs2);
    }

    #[test]
    fn ucs2_single_and_concatenated_limits() {
        assert_eq!(shape(&gsm(70, 'я')).segments, 1);
        assert_eq!(shape(&gsm(71, 'я')).segments, 2);
        assert_eq!(shape(&gsm(134, 'я')).segments, 2);
        let s = shape(&gsm(135, 'я'));
        assert_eq!((s.encoding, s.units, s.segments), (Encoding::Ucs2, 135, 3));
        assert_eq!(s.describe(), "3 segments, UCS-2");
    }

    #[test]
    fn ucs2_counts_utf16_units_and_keeps_surrogate_pairs_whole() {
        let s = shape(&gsm(35, '😀'));
        assert_eq!((s.units, s.segments), (70, 1));
        let s = shape(&gsm(36, '😀'));
        assert_eq!((s.units, s.segments), (72, 2));
        // 66 units, then a pair: part one has one unit left, the pair moves to part two
        let text = format!("{}😀{}", gsm(66, 'я'), gsm(65, 'я'));
        let s = shape(&text);
        assert_eq!(s.units, 133);
        assert_eq!(s.segments, 2);
        let text = format!("{}😀{}", gsm(66, 'я'), gsm(66, 'я'));
        let s = shape(&text);
        assert_eq!(s.units, 134);
        assert_eq!(s.segments, 3);
    }

    #[test]
    fn empty_text_is_one_segment() {
        assert_eq!(
            shape(""),
            SmsShape {
                encoding: Encoding::Gsm7,
                segments: 1,
                units: 0
            }
        );
    }

    #[test]
    fn encoding_names_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&Encoding::Gsm7).ok().as_deref(),
            Some("\"GSM-7\"")
        );
        assert_eq!(
            serde_json::to_string(&Encoding::Ucs2).ok().as_deref(),
            Some("\"UCS-2\"")
        );
    }
}
