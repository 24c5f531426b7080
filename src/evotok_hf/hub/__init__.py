"""Hub-facing tools: conversion of the authors' checkpoints, model-card rendering, remote-code export."""
