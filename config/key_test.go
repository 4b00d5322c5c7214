package config

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseKey(t *testing.T) {
	const plain = "a-plain-key-0123456789"
	hashed := HashKey(plain)
	tests := []struct {
		name    string
		in      string
		wantErr string // substring; "" = valid
	}{
		{"plain", plain, ""},
		{"plain, exactly 16", "0123456789abcdef", ""},
		{"hashed", hashed, ""},
		{"hashed, upper-case hex", "sha256:" + strings.ToUpper(hashed[len("sha256:"):]), ""},
		{"plain too short", "0123456789abcde", "at least 16 characters long, this one has 15"},
		{"empty", "", "empty key"},
		{"space", "0123456789 abcdef", "printable ASCII characters without spaces"},
		{"non-ASCII", "0123456789abcdéf", "printable ASCII characters without spaces"},
		{"hash too short", "sha256:abcd", "64 hex digits, got 4 characters"},
		{"hash too long", hashed + "00", "64 hex digits, got 66 characters"},
		{"hash not hex", "sha256:" + strings.Repeat("g", 64), "not a hex digit"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, err := ParseKey(tt.in)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("ParseKey: %v", err)
				}
				if !strings.HasPrefix(k.String(), "sha256:") || len(k.String()) != len("sha256:")+64 {
					t.Errorf("String() = %q, want sha256:<64 hex>", k.String())
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("ParseKey error = %v, want one containing %q", err, tt.wantErr)
			}
			if tt.in != "" && strings.Contains(err.Error(), tt.in) {
				t.Errorf("the error repeats the key: %v", err)
			}
			if (k != Key{}) {
				t.Errorf("a failed parse returned a non-zero Key")
			}
		})
	}
}

func TestKeyMatches(t *testing.T) {
	const plain = "a-plain-key-0123456789"
	fromPlain := mustKey(t, plain)
	fromHash := mustKey(t, HashKey(plain))
	if !fromPlain.Equal(fromHash) {
		t.Errorf("a plain key and its hash must be the same Key")
	}
	if diff := cmp.Diff(fromPlain, fromHash); diff != "" {
		t.Errorf("cmp sees a difference (-plain +hash):\n%s", diff)
	}
	tests := []struct {
		key       Key
		presented string
		want      bool
	}{
		{fromPlain, plain, true},
		{fromHash, plain, true},
		{fromPlain, plain + "x", false},
		{fromPlain, strings.ToUpper(plain), false},
		{fromPlain, "", false},
		{fromHash, HashKey(plain), false}, // presenting the hash is not presenting the key
		{Key{}, "", false},                // the zero Key matches nothing, not even ""
		{Key{}, plain, false},
	}
	for _, tt := range tests {
		if got := tt.key.Matches(tt.presented); got != tt.want {
			t.Errorf("%v.Matches(%q) = %v, want %v", tt.key, tt.presented, got, tt.want)
		}
	}
}

func TestKeyStringHidesPlainKey(t *testing.T) {
	const plain = "a-plain-key-0123456789"
	k := mustKey(t, plain)
	for _, s := range []string{k.String(), k.short()} {
		if strings.Contains(s, plain) {
			t.Errorf("%q contains the plain key", s)
		}
	}
	if got, want := k.String(), HashKey(plain); got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if got, want := k.short(), HashKey(plain)[:15]+"…"; got != want {
		t.Errorf("short() = %q, want %q", got, want)
	}
	text, _ := k.MarshalText()
	if string(text) != HashKey(plain) {
		t.Errorf("MarshalText = %q, want the hashed form", text)
	}
	if got := (Key{}).String(); got != "(no key)" {
		t.Errorf("zero Key String() = %q", got)
	}
}
