package config

import (
	"fmt"
	"unicode"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
)

// MaxUserIDLength is the most characters (code points, counted after
// normalisation) a user id may have.
const MaxUserIDLength = 256

// userIDChars are the Unicode categories a user id may be made of: letters,
// marks, numbers, punctuation, symbols, the space separators (Zs: U+0020,
// NBSP U+00A0, the ideographic space U+3000…) and the format characters
// (Cf: ZWJ U+200D in emoji sequences, LRM U+200E, soft hyphen…).
var userIDChars = []*unicode.RangeTable{unicode.L, unicode.M, unicode.N, unicode.P, unicode.S, unicode.Zs, unicode.Cf}

// NormalizeUserID checks that s is a user id and returns its one canonical
// form, the form sluice keeps, counts quotas under and compares. It is the
// only rule for a user id, wherever one enters: a job's user_id or
// request.metadata.user_id, a Messages request's metadata.user_id, the
// user_id query parameter, the {user_id} of a path, and the keys of a
// tenant's users: in the configuration.
//
// The rule:
//
//   - s is valid UTF-8 and not empty;
//   - every character is a letter, mark, number, punctuation, symbol, space
//     separator or format character (Unicode categories L, M, N, P, S, Zs,
//     Cf), so 👩‍🎓 (with its zero-width joiner), "josé", "a/b", NBSP
//     (U+00A0), the ideographic space (U+3000) and LRM (U+200E) are
//     accepted; control characters (Cc: NUL, tab, newline…), the line and
//     paragraph separators U+2028 and U+2029, private-use characters (Co)
//     and code points Unicode has not assigned (Cn) are refused;
//   - s is normalised to NFC (Unicode canonical composition), so "josé"
//     written with a precomposed é (U+00E9) and with e + U+0301 are one
//     user; the result is what is returned;
//   - the result is at most MaxUserIDLength (256) characters long.
//
// Nothing else is changed: case, spaces at either end and compatibility
// forms (NFKC) are kept, so "Alice", "alice" and " alice" are three users.
// A refusal is a *UserIDError.
func NormalizeUserID(s string) (string, error) {
	if s == "" {
		return "", &UserIDError{Problem: UserIDEmpty}
	}
	if !utf8.ValidString(s) {
		return "", &UserIDError{Problem: UserIDInvalidUTF8}
	}
	n := 0
	for _, r := range s {
		n++
		if !unicode.IsOneOf(userIDChars, r) {
			return "", &UserIDError{Problem: UserIDBadChar, Char: r, At: n}
		}
	}
	s = norm.NFC.String(s)
	if n := utf8.RuneCountInString(s); n > MaxUserIDLength {
		return "", &UserIDError{Problem: UserIDTooLong, Length: n}
	}
	return s, nil
}

// What is wrong with a user id (UserIDError.Problem).
const (
	UserIDEmpty       = "empty"
	UserIDInvalidUTF8 = "invalid_utf8"
	UserIDBadChar     = "bad_char"
	UserIDTooLong     = "too_long"
)

// UserIDError is why a string is not a user id (NormalizeUserID).
type UserIDError struct {
	Problem string // UserIDEmpty, UserIDInvalidUTF8, UserIDBadChar or UserIDTooLong
	Char    rune   // UserIDBadChar: the character refused
	At      int    // UserIDBadChar: its position, in characters from 1
	Length  int    // UserIDTooLong: the length found, in characters
}

func (e *UserIDError) Error() string {
	switch e.Problem {
	case UserIDEmpty:
		return "is empty"
	case UserIDInvalidUTF8:
		return "is not valid UTF-8 text"
	case UserIDBadChar:
		return fmt.Sprintf("contains %s at character %d", DescribeChar(e.Char), e.At)
	case UserIDTooLong:
		return fmt.Sprintf("is %d characters long; the limit is %d", e.Length, MaxUserIDLength)
	}
	return "is not a valid user id"
}

// DescribeChar names a refused character for a person: its code point and
// what kind of character it is, e.g. "U+2028 (a line separator)".
func DescribeChar(r rune) string {
	var kind string
	switch {
	case unicode.Is(unicode.Cc, r):
		kind = "a control character"
	case r == '\u2028':
		kind = "a line separator"
	case r == '\u2029':
		kind = "a paragraph separator"
	case unicode.Is(unicode.Co, r):
		kind = "a private-use character"
	case unicode.Is(unicode.Cs, r):
		kind = "a surrogate, not a character"
	case unicode.IsOneOf(userIDChars, r):
		kind = "an allowed character"
	default:
		kind = "a code point Unicode has not assigned"
	}
	return fmt.Sprintf("U+%04X (%s)", r, kind)
}
