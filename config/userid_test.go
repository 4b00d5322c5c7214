package config

import (
	"errors"
	"strings"
	"testing"
)

func TestNormalizeUserID(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
	}{
		{"ASCII", "alice", "alice"},
		{"slash and percent", "a/b%20", "a/b%20"},
		{"emoji ZWJ sequence", "👩\u200d🎓", "👩\u200d🎓"},
		{"flag (regional indicators)", "🇫🇷", "🇫🇷"},
		{"variation selector", "❤\ufe0f", "❤\ufe0f"},
		{"NBSP", "a\u00a0b", "a\u00a0b"},
		{"ideographic space", "a\u3000b", "a\u3000b"},
		{"LRM", "\u200ea", "\u200ea"},
		{"soft hyphen", "a\u00adb", "a\u00adb"},
		{"NFD to NFC", "jose\u0301", "jos\u00e9"},
		{"NFC kept", "jos\u00e9", "jos\u00e9"},
		{"Hangul jamo composed", "\u1100\u1161", "\uac00"},
		{"case kept", "Alice", "Alice"},
		{"spaces kept", " a ", " a "},
		{"compatibility forms kept (not NFKC)", "ﬁ①", "ﬁ①"},
		{"replacement character is a symbol", "a\ufffd", "a\ufffd"},
		{"256 characters", strings.Repeat("x", 256), strings.Repeat("x", 256)},
		{"256 characters once composed", strings.Repeat("e\u0301", 256), strings.Repeat("é", 256)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := NormalizeUserID(tc.in)
			if err != nil || got != tc.want {
				t.Fatalf("NormalizeUserID(%+q) = %+q, %v; want %+q", tc.in, got, err, tc.want)
			}
		})
	}
	for _, tc := range []struct {
		name, in, problem, msg string
	}{
		{"empty", "", UserIDEmpty, "is empty"},
		{"invalid UTF-8", "a\xffb", UserIDInvalidUTF8, "UTF-8"},
		{"truncated UTF-8", "a\xc3", UserIDInvalidUTF8, "UTF-8"},
		{"NUL", "a\x00b", UserIDBadChar, "contains U+0000 (a control character) at character 2"},
		{"newline", "ab\n", UserIDBadChar, "U+000A (a control character) at character 3"},
		{"tab", "\t", UserIDBadChar, "control"},
		{"DEL", "\x7f", UserIDBadChar, "control"},
		{"C1 control", "\u0085", UserIDBadChar, "control"},
		{"line separator", "a\u2028", UserIDBadChar, "U+2028 (a line separator)"},
		{"paragraph separator", "a\u2029", UserIDBadChar, "U+2029 (a paragraph separator)"},
		{"private use", "\ue000", UserIDBadChar, "private-use"},
		{"unassigned", "\U000e0080", UserIDBadChar, "not assigned"},
		{"257 characters", strings.Repeat("x", 257), UserIDTooLong, "257 characters long; the limit is 256"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NormalizeUserID(tc.in)
			var ue *UserIDError
			if !errors.As(err, &ue) || ue.Problem != tc.problem || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("NormalizeUserID(%+q) error = %v; want %s, %q", tc.in, err, tc.problem, tc.msg)
			}
		})
	}
}

// tenants[].users: keys are user ids, kept in NFC (the form the api looks
// them up in); two keys that are one user, or a key that is no user id,
// are refused.
func TestConfigUserIDs(t *testing.T) {
	doc := func(users string) []byte {
		return []byte("tenants:\n  - name: acme\n    keys: [\"acme-key-0123456789\"]\n    users:\n" + users +
			"model_groups:\n  - {name: sonnet, models: [\"claude-sonnet-*\"], rpm: 50, input_tpm: 30000, output_tpm: 8000}\n")
	}
	c, err := Parse(doc("      \"jose\\u0301\": {requests_per_hour: 5}\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if p := c.Tenants[0].Policy("jos\u00e9"); p.RequestsPerHour != 5 {
		t.Fatalf("the NFD key does not apply to the user: %+v (users %v)", p, c.Tenants[0].Users)
	}
	_, err = Parse(doc("      \"jose\\u0301\": {requests_per_hour: 5}\n      \"jos\\u00e9\": {requests_per_hour: 6}\n"), nil)
	if err == nil || !strings.Contains(err.Error(), "the same user as") {
		t.Fatalf("two spellings of one user: %v", err)
	}
	_, err = Parse(doc("      \"a\\u2028b\": {requests_per_hour: 5}\n"), nil)
	if err == nil || !strings.Contains(err.Error(), `tenants[0].users["a\u2028b"]: not a user id: it contains U+2028 (a line separator)`) {
		t.Fatalf("a key that is no user id: %v", err)
	}
}
