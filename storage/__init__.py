"""Persistence for lmbridge. The service talks to the store's methods, never to SQL."""
