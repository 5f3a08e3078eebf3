package main

import (
	"flag"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/s3store"
)

// s3Flags say how to reach a bucket named by an s3:// store URL; what
// they leave out comes from the URL, then from the AWS environment
// (s3store.ParseURL).
type s3Flags struct {
	endpoint, region, credentials, profile string
}

func (f *s3Flags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.endpoint, "s3-endpoint", "", "the S3 API's `address` for an s3:// store: host:port or http(s)://host:port (default: the URL's endpoint=, AWS_ENDPOINT_URL, else AWS)")
	fs.StringVar(&f.region, "s3-region", "", "the bucket's `region` (default: the URL's region=, AWS_REGION)")
	fs.StringVar(&f.credentials, "s3-credentials", "", "read the S3 keys from this AWS credentials `file` when AWS_ACCESS_KEY_ID is not set (default ~/.aws/credentials)")
	fs.StringVar(&f.profile, "s3-profile", "", "the credentials file's `profile` (default: the URL's profile=, AWS_PROFILE, else default)")
}

// isStoreURL tells a bucket's URL from a cache directory.
func isStoreURL(s string) bool { return strings.HasPrefix(s, "s3://") }

// config returns the bucket's configuration for the store URL raw.
func (f *s3Flags) config(raw string, log *logrus.Entry) (s3store.Config, error) {
	cfg, err := s3store.ParseURL(raw)
	if err != nil {
		return cfg, usagef("%v", err)
	}
	if f.region != "" {
		cfg.Region = f.region
		if f.endpoint == "" && strings.HasSuffix(cfg.Endpoint, ".amazonaws.com") {
			cfg.SetEndpoint("") // AWS's endpoint for that region
		}
	}
	if f.endpoint != "" {
		if err := cfg.SetEndpoint(f.endpoint); err != nil {
			return cfg, usagef("--s3-endpoint: %v", err)
		}
	}
	cfg.CredentialsFile = f.credentials
	if f.profile != "" {
		cfg.Profile = f.profile
	}
	cfg.Log = log
	return cfg, nil
}

// open returns the store for the URL raw.
func (f *s3Flags) open(raw string, log *logrus.Entry) (*s3store.Store, s3store.Config, error) {
	cfg, err := f.config(raw, log)
	if err != nil {
		return nil, cfg, err
	}
	st, err := s3store.New(cfg)
	return st, cfg, err
}
