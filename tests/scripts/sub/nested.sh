#!/bin/sh
echo "nested ok"
